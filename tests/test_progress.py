"""gandl_jax.progress: rate, ETA and the restart after a start-up cost."""
from gandl_jax import progress as progress_lib


class Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def test_eta_from_the_rate_since_start_and_after_restart():
  clock, lines = Clock(), []
  p = progress_lib.Progress(1000, done=200, unit="img", every_s=0.0,
                            log=lines.append, clock=clock)
  clock.t = 90.0                 # a resumed run compiles for 90 s
  p.restart()
  clock.t = 100.0
  p.update(100)                  # 100 img in 10 s: 10 img/s
  assert p.rate == 10.0
  assert p.eta_s == 70.0         # 700 img left, closed form
  assert "ETA 00:01:10" in lines[-1]
  # Without the restart the 90 s of compilation count: 1 img/s, ETA 700 s.
  q = progress_lib.Progress(1000, done=200, clock=clock, log=lines.append)
  q.start = 0.0
  q.update(100)
  assert q.rate == 1.0 and q.eta_s == 700.0


def test_interval_rate_restarts_too():
  clock = Clock()
  p = progress_lib.Progress(None, clock=clock, log=lambda _: None)
  clock.t = 50.0
  p.restart()
  clock.t = 52.0
  p.set(20)
  assert p.interval_rate() == 10.0
  assert p.eta_s != p.eta_s      # unknown total: NaN


def test_format_duration():
  assert progress_lib.format_duration(3 * 86400 + 3723.4) == "3d 01:02:03"
  assert progress_lib.format_duration(float("inf")) == "?"
