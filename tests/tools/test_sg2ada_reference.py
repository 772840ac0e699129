"""tools/bench/sg2ada_reference.py without torch: the client against stand-in
workers (small scripts speaking the worker's protocol through its own `serve`
and `ops_report`) that print like the reference's op builds, hang, or fail
to build their ops; and the precision settings the worker applies."""
import copy
import os
import sys
import textwrap
import types

import pytest

from tools.bench import sg2ada_reference as sg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A stand-in for the reference: prints what torch_utils/custom_ops.py prints
# while building (the 'brief' form has no newline), then serves the protocol
# with the worker's own functions. {build} is 'ok', 'fail' or 'hang'.
FAKE = textwrap.dedent("""\
    import os, sys, time, types
    sys.path.insert(0, {repo!r})
    from tools.bench import sg2ada_reference as sg

    def op(name, build):
      mod = types.SimpleNamespace(_plugin=None)
      def init():
        if mod._plugin is None:
          print(f'Setting up PyTorch plugin "{{name}}"... ', end='', flush=True)
          if build == 'hang':
            time.sleep(600)
          if build == 'ok':
            mod._plugin = object()
          print('Done.' if build == 'ok' else 'Failed!')
        return mod._plugin is not None
      mod._init = init
      return mod

    class Ref:
      def train(self, n):
        if {hang_train}:
          time.sleep(600)
        print('iteration noise')
        return 0.5 * n, 4 * n
      embed = train

    ops = sg.ops_report('cuda', {{'upfirdn2d': op('upfirdn2d_plugin', {build!r}),
                                 'bias_act': op('bias_act_plugin', {build!r})}})
    print('UserWarning: a line without a newline at the end', end='')
    impls = set(ops.values())
    sg.serve(Ref(), {{'custom_ops': impls.pop() if len(impls) == 1 else 'mixed',
                     'custom_ops_by_op': ops,
                     'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY') or 'default'}})
    """)


def _worker(tmp_path, build="ok", hang_train=False, **kw):
  script = tmp_path / "fake_reference.py"
  script.write_text(FAKE.format(repo=REPO, build=build,
                                hang_train=hang_train))
  return sg.Worker(str(tmp_path / "stylegan2-ada-pytorch"), {},
                   argv=[sys.executable, str(script)], **kw)


def test_results_survive_the_reference_printing_around_them(tmp_path):
  w = _worker(tmp_path, timeout=60, start_timeout=60)
  try:
    assert w.info["ready"] is True
    assert w.info["custom_ops"] == "cuda"
    assert w.info["custom_ops_by_op"] == {"upfirdn2d": "cuda",
                                          "bias_act": "cuda"}
    assert w.run("train", 3) == (1.5, 12, pytest.approx(0, abs=1.0))
    assert w.run("embed", 2)[:2] == (1.0, 8)
  finally:
    w.close()
  noise = "".join(w.noise)
  assert 'Setting up PyTorch plugin "upfirdn2d_plugin"... Done.' in noise
  assert "a line without a newline" in noise and "iteration noise" in noise


def test_failed_op_build_is_reported_as_ref(tmp_path):
  w = _worker(tmp_path, build="fail", timeout=60, start_timeout=60)
  try:
    assert w.info["custom_ops"] == "ref"
    assert w.info["custom_ops_by_op"] == {"upfirdn2d": "ref",
                                          "bias_act": "ref"}
  finally:
    w.close()
  assert "Failed!" in "".join(w.noise)


def test_ops_report_off_cuda_and_mixed():
  built = types.SimpleNamespace(_plugin=object(), _init=lambda: True)
  broken = types.SimpleNamespace(_plugin=None, _init=lambda: False)

  def raising():
    raise RuntimeError("no nvcc")
  crashing = types.SimpleNamespace(_plugin=None, _init=raising)
  assert sg.ops_report("cpu", {"a": built}) == {"a": "ref"}
  assert sg.ops_report("cuda", {"a": built, "b": broken, "c": crashing}) == {
      "a": "cuda", "b": "ref", "c": "ref"}


def test_hung_start_up_times_out_naming_the_checkout(tmp_path):
  w = None
  with pytest.raises(sg.WorkerTimeout) as e:
    w = _worker(tmp_path, build="hang", start_timeout=1.5)
  assert w is None
  msg = str(e.value)
  assert str(tmp_path / "stylegan2-ada-pytorch") in msg
  assert "start-up" in msg and " in 2 s" in msg and "limit 2 s" in msg
  assert "upfirdn2d_plugin" in msg        # its last output


def test_hung_round_times_out_and_stops_the_worker(tmp_path):
  w = _worker(tmp_path, hang_train=True, timeout=1.0, start_timeout=60)
  with pytest.raises(sg.WorkerTimeout, match=r"'train 2' in 1 s"):
    w.run("train", 2)
  assert w._proc.poll() is not None      # pylint: disable=protected-access
  w.close()


def test_omp_wait_policy_is_torchs_default_unless_asked(tmp_path, monkeypatch):
  monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
  w = _worker(tmp_path, timeout=60, start_timeout=60)
  w.close()
  assert w.info["omp_wait_policy"] == "default"
  w = _worker(tmp_path, timeout=60, start_timeout=60,
              omp_wait_policy="PASSIVE")
  w.close()
  assert w.info["omp_wait_policy"] == "PASSIVE"


def test_worker_that_exits_reports_its_stderr(tmp_path):
  script = tmp_path / "dies.py"
  script.write_text("import sys\nprint('Setting up...')\n"
                    "sys.exit('ImportError: no module named dnnlib')\n")
  with pytest.raises(RuntimeError, match="(?s)exited with status 1.*dnnlib"):
    sg.Worker("REF", {}, argv=[sys.executable, str(script)], timeout=60,
              start_timeout=60)


class _Module:
  """A torch.nn.Module stand-in for Reference's bookkeeping calls."""

  def train(self, *a):
    return self

  eval = requires_grad_ = train

  def to(self, device):
    return self

  def __deepcopy__(self, memo):
    return _Module()


def test_reference_turns_tf32_off_as_training_loop_does(monkeypatch):
  backends = types.SimpleNamespace(
      cudnn=types.SimpleNamespace(benchmark=False, allow_tf32=True),
      cuda=types.SimpleNamespace(matmul=types.SimpleNamespace(
          allow_tf32=True)))
  torch = types.SimpleNamespace(
      backends=backends, device=lambda t: types.SimpleNamespace(type=t),
      cuda=types.SimpleNamespace(is_available=lambda: True),
      manual_seed=lambda s: None)
  gradfix = types.SimpleNamespace(enabled=False)
  networks = types.SimpleNamespace(Generator=lambda **k: _Module(),
                                   Discriminator=lambda **k: _Module())
  monkeypatch.setattr(sg, "_import_reference", lambda d: (
      torch, None, gradfix, copy.copy(gradfix), None, networks))
  spec = {"mode": "embed", "batch_size": 4, "model": {
      "resolution": 8, "img_channels": 5, "z_dim": 8, "w_dim": 8,
      "mapping_layers": 2, "mapping_lr_multiplier": 0.01,
      "channel_base": 64, "channel_max": 16, "conv_clamp": None,
      "mbstd_group_size": 4, "mbstd_num_channels": 1}}
  sg.Reference(spec, "REF")
  assert backends.cudnn.allow_tf32 is False
  assert backends.cuda.matmul.allow_tf32 is False
  assert backends.cudnn.benchmark is True and gradfix.enabled is True
