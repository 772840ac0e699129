#!/usr/bin/env python3
"""Keeps GAN-DL training alive on a Cloud TPU through preemptions.

Every --interval seconds the watcher reads the TPU's state and acts:

  missing                       create it
  preempted (queued resource    delete and recreate it (spot capacity cannot
  SUSPENDED/FAILED, VM          be restarted in place)
  PREEMPTED/TERMINATED)
  ready, just (re)created       install the package and start training: it
                                resumes from the latest checkpoint in --workdir
  ready, training running       nothing
  ready, a worker crashed       SIGTERM the survivors, then start again once
                                all stopped (at most --max-restarts times)
  ready, stopped by a user      (`tpu_train.py stop` leaves a marker on the
                                workers) exit without restarting: a
                                deliberate stop is neither a crash nor a
                                preemption
  ready, workers exited 143     SIGTERM stop after a checkpoint (preemption):
                                if the TPU is still up on the next poll, start
                                again (not counted in --max-restarts)
  ready, every worker exited 0  on two polls in a row: training finished;
                                exit (deleting the TPU with --delete-when-done)
  anything else (provisioning)  wait

Run it where it can stay up for the whole training (a small VM, or a tmux /
nohup session on a workstation):

  nohup python3 launch/tpu_watch.py --name gandl --queued --spot \\
      --bucket my-bucket > gandl-watch.log 2>&1 &

--dry-run prints the commands of every branch; --dry-run --simulate
STATE[/TRAIN],... drives the real loop with made-up observations and prints
the commands it would issue in order (see --help).
"""
import argparse
import sys
from typing import Callable, Iterator, List, Optional

import runner as runner_lib
import tpu_commands as tc

READY, PENDING, PREEMPTED, MISSING, UNKNOWN = (
    "ready", "pending", "preempted", "missing", "unknown")

QUEUED_STATES = {
    "ACTIVE": READY,
    "ACCEPTED": PENDING, "CREATING": PENDING, "PROVISIONING": PENDING,
    "WAITING_FOR_RESOURCES": PENDING, "DELETING": PENDING,
    "SUSPENDING": PREEMPTED, "SUSPENDED": PREEMPTED, "FAILED": PREEMPTED,
}
VM_STATES = {
    "READY": READY,
    "CREATING": PENDING, "STARTING": PENDING, "RESTARTING": PENDING,
    "REPAIRING": PENDING, "DELETING": PENDING,
    "PREEMPTED": PREEMPTED, "TERMINATED": PREEMPTED,
}
# Per-worker status words of --simulate, as status_script() prints them.
_SIM_WORKER = {"running": "running", "done": "exited 0",
               "failed": "exited 1", "absent": "absent",
               "preempted": f"exited {tc.EXIT_PREEMPTED}",
               "stopped": "stopped"}


def classify_state(queued: bool, returncode: int, stdout: str,
                   stderr: str) -> str:
  """Maps a describe call's result to ready/pending/preempted/missing/unknown."""
  if returncode != 0:
    text = stderr.lower()
    return MISSING if ("not_found" in text or "not found" in text) else UNKNOWN
  word = stdout.strip().upper()
  return (QUEUED_STATES if queued else VM_STATES).get(word, UNKNOWN)


def train_counts(stdout: str) -> dict:
  """Counts the workers' status lines: running, ok (exited 0), preempted
  (exited 143: SIGTERM, checkpoint saved), stopped (by a user), failed
  (any other status), absent."""
  counts = dict(running=0, ok=0, failed=0, absent=0, preempted=0, stopped=0)
  for line in stdout.splitlines():
    line = line.strip()
    if not line.startswith(tc.STATUS_PREFIX):
      continue
    word = line[len(tc.STATUS_PREFIX):].strip()
    if word == "running":
      counts["running"] += 1
    elif word == "absent":
      counts["absent"] += 1
    elif word == "exited 0":
      counts["ok"] += 1
    elif word == f"exited {tc.EXIT_PREEMPTED}":
      counts["preempted"] += 1
    elif word == "stopped":
      counts["stopped"] += 1
    else:
      counts["failed"] += 1
  return counts


class Simulation:
  """Made-up observations for --dry-run --simulate, one token per poll."""

  def __init__(self, spec: str, queued: bool):
    self.tokens = [t for t in spec.split(",") if t]
    self.queued = queued
    self.current: Optional[str] = None
    self._iter: Iterator[str] = iter(self.tokens)
    for token in self.tokens:
      self._parse(token)   # fail early on a typo

  def _parse(self, token: str):
    state, _, train = token.partition("/")
    known = QUEUED_STATES if self.queued else VM_STATES
    if state != "MISSING" and state not in known:
      raise ValueError(f"--simulate: unknown state {state!r} in {token!r}; "
                       f"expected MISSING or one of {', '.join(known)}")
    workers = [w for w in train.split("+") if w] if train else []
    for w in workers:
      if w not in _SIM_WORKER:
        raise ValueError(f"--simulate: unknown training status {w!r} in "
                         f"{token!r}; expected {'|'.join(_SIM_WORKER)} "
                         f"joined by '+' (one per worker)")
    return state, workers

  def next_poll(self) -> bool:
    self.current = next(self._iter, None)
    return self.current is not None

  def describe(self) -> tuple:
    state, _ = self._parse(self.current)
    if state == "MISSING":
      return 1, "", "ERROR: (gcloud) NOT_FOUND: resource not found"
    return 0, state + "\n", ""

  def status(self) -> tuple:
    _, workers = self._parse(self.current)
    if not workers:
      raise ValueError(f"--simulate: token {self.current!r} is read for the "
                       f"training status; add /running, /done, /failed or "
                       f"/absent")
    lines = [f"{tc.STATUS_PREFIX} {_SIM_WORKER[w]}" for w in workers]
    return 0, "\n".join(lines) + "\n", ""


class Watcher:
  """The preemption-restart loop (see the module docstring)."""

  def __init__(self, args, runner: runner_lib.Runner,
               simulation: Optional[Simulation] = None):
    self.args = args
    self.runner = runner
    self.sim = simulation
    self.restarts = 0
    self.recreations = 0
    self.done_polls = 0
    self.signal_polls = 0
    # True: a TPU this watcher (re)created, needing install + start.
    # None: a TPU found at start-up, whose install state is unknown.
    self.fresh: Optional[bool] = None

  # -- probes --
  def _state(self) -> str:
    sim = (self.sim.describe if self.sim else
           lambda: (0, "READY\n" if not self.args.queued else "ACTIVE\n", ""))
    rc, out, err = self.runner.query(tc.describe_command(self.args), sim)
    return classify_state(self.args.queued, rc, out, err)

  def _train(self) -> dict:
    sim = self.sim.status if self.sim else (lambda: (0, "", ""))
    rc, out, _ = self.runner.query(
        tc.ssh_command(self.args, tc.status_script()), sim)
    counts = train_counts(out)
    if rc != 0 and sum(counts.values()) == 0:
      counts["unreachable"] = 1
    return counts

  # -- actions --
  def _run_all(self, cmds: List[List[str]]) -> bool:
    for cmd in cmds:
      if self.runner.run(cmd, check=False) != 0:
        self.runner.comment("command failed; retrying after the next poll")
        return False
    return True

  def _start(self) -> bool:
    return self._run_all([tc.ssh_command(self.args, tc.start_script(self.args))])

  def _install_and_start(self) -> None:
    self.runner.comment("installing on every worker, then starting training "
                        f"(resumes from the latest checkpoint in "
                        f"{self.args.workdir})")
    if self._run_all(tc.install_commands(self.args)) and self._start():
      self.fresh = False

  def _recreate(self, delete_first: bool) -> Optional[int]:
    self.recreations += 1
    if self.recreations > self.args.max_recreates:
      self.runner.comment(f"giving up: {self.args.max_recreates} "
                          f"recreations reached (--max-recreates)")
      return 1
    if delete_first:
      self._run_all(tc.delete_commands(self.args))
    self._run_all(tc.create_commands(self.args))
    self.fresh = True
    self.done_polls = self.signal_polls = 0
    return None

  def _on_ready(self) -> Optional[int]:
    if self.fresh:
      self._install_and_start()
      return None
    counts = self._train()
    if counts.get("unreachable"):
      self.runner.comment("workers unreachable over ssh; checking again "
                          "next poll")
      return None
    if counts["stopped"]:
      if counts["running"]:
        self.runner.comment("training is being stopped by a user: waiting")
        return None
      self.runner.comment(
          f"training was stopped by a user (~/{tc.TRAIN_STOPPED} on the "
          f"workers): not restarting. Start it again with tpu_train.py "
          f"start, then run the watcher again")
      return 0
    if counts["failed"] and counts["running"]:
      self.runner.comment("a worker's training exited with an error: "
                          "stopping the others before restarting")
      self._run_all([tc.ssh_command(self.args,
                                    tc.stop_script(user=False))])
      return None
    if counts["failed"] or (counts["ok"] and counts["absent"]):
      self.restarts += 1
      if self.restarts > self.args.max_restarts:
        self.runner.comment(f"giving up: training failed "
                            f"{self.restarts} times (--max-restarts "
                            f"{self.args.max_restarts}); see ~/"
                            f"{tc.TRAIN_LOG} on the workers")
        return 1
      self.runner.comment(f"training failed: restart {self.restarts}/"
                          f"{self.args.max_restarts} from the latest "
                          f"checkpoint")
      self._start()
      self.done_polls = 0
      return None
    if counts["running"]:
      self.runner.comment(f"training running on {counts['running']} "
                          f"worker(s)")
      self.done_polls = self.signal_polls = 0
      self.fresh = False
      return None
    if counts["preempted"]:
      # SIGTERM with a checkpoint saved and no user's marker: a preemption
      # (the TPU shows it by the next poll) or another signal; either way
      # training resumes, and that is not a crash.
      self.signal_polls += 1
      if self.signal_polls < 2:
        self.runner.comment(f"training stopped on SIGTERM (exit "
                            f"{tc.EXIT_PREEMPTED}, checkpoint saved): "
                            f"checking on the next poll whether the TPU "
                            f"was preempted")
        return None
      self.runner.comment("training stopped on SIGTERM and the TPU is up: "
                          "starting it again (resumes; not counted as a "
                          "crash)")
      if self._start():
        self.signal_polls = 0
      return None
    if counts["ok"]:
      # A preempted worker's run also exits 0 after its SIGTERM checkpoint;
      # the TPU still being up a poll later tells a real finish apart.
      self.done_polls += 1
      if self.done_polls < 2:
        self.runner.comment("every worker exited 0: confirming on the next "
                            "poll that the TPU was not preempted")
        return None
      self.runner.comment("training finished")
      if self.args.delete_when_done:
        self._run_all(tc.delete_commands(self.args))
      return 0
    # Nothing ever started on this TPU.
    if self.fresh is None:
      self._install_and_start()
    elif self._start():
      self.fresh = False
    return None

  def poll(self) -> Optional[int]:
    """One observation and its action; an int ends the loop with that code."""
    state = self._state()
    if state == MISSING:
      self.runner.comment("TPU not found: creating it")
      return self._recreate(delete_first=False)
    if state == PREEMPTED:
      self.runner.comment("TPU preempted: deleting and recreating it")
      return self._recreate(delete_first=True)
    if state == READY:
      return self._on_ready()
    self.runner.comment(f"TPU {state}: waiting")
    return None

  def loop(self) -> int:
    while True:
      if self.sim is not None and not self.sim.next_poll():
        self.runner.comment("end of simulated observations")
        return 0
      code = self.poll()
      if code is not None:
        return code
      self.runner.sleep(self.args.interval)


def print_plan(args, runner: runner_lib.Runner) -> None:
  """--dry-run without --simulate: every branch's commands, labelled."""
  kind = (f"queued resource {args.queued_resource_id}" if args.queued
          else "TPU VM")
  runner.comment(f"watch {kind} node {args.name}: one poll every "
                 f"{args.interval} s")
  runner.comment("1. read the state")
  runner.run(tc.describe_command(args))
  runner.comment("2. missing: create")
  for cmd in tc.create_commands(args):
    runner.run(cmd)
  runner.comment("3. preempted (" + "/".join(
      sorted(k for k, v in (QUEUED_STATES if args.queued else VM_STATES)
             .items() if v == PREEMPTED)) + "): delete, then create")
  for cmd in tc.delete_commands(args) + tc.create_commands(args):
    runner.run(cmd)
  runner.comment("4. ready after (re)creation: install, then start training "
                 f"(it resumes from the latest checkpoint in {args.workdir})")
  for cmd in tc.install_commands(args):
    runner.run(cmd)
  runner.run(tc.ssh_command(args, tc.start_script(args)))
  runner.comment("5. ready: training status of every worker")
  runner.run(tc.ssh_command(args, tc.status_script()))
  runner.comment("6. a worker failed while others run: stop them")
  runner.run(tc.ssh_command(args, tc.stop_script(user=False)))
  runner.comment(f"7. all stopped after a failure: start again (at most "
                 f"{args.max_restarts} times)")
  runner.run(tc.ssh_command(args, tc.start_script(args)))
  runner.comment("8. all exited 0 on two polls: finished" +
                 (", delete the TPU" if args.delete_when_done else ""))
  if args.delete_when_done:
    for cmd in tc.delete_commands(args):
      runner.run(cmd)
  runner.comment("otherwise wait for the next poll")
  runner.sleep(args.interval)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  tc.add_target_args(parser)
  tc.add_create_args(parser)
  tc.add_install_args(parser)
  tc.add_run_args(parser)
  tc.add_set_args(parser)
  group = parser.add_argument_group("watching")
  group.add_argument("--interval", type=int, default=300,
                     help="Seconds between polls (default 300).")
  group.add_argument("--max-restarts", type=int, default=10,
                     help="Training crashes to restart before giving up.")
  group.add_argument("--max-recreates", type=int, default=100,
                     help="TPU (re)creations before giving up.")
  group.add_argument("--delete-when-done", action="store_true",
                     help="Delete the TPU once training has finished.")
  parser.add_argument("--dry-run", action="store_true",
                      help="Print the commands instead of running them.")
  parser.add_argument("--simulate", default=None, metavar="OBS,OBS,...",
                      help="With --dry-run: one observation per poll, "
                      "STATE or STATE/W1+W2+... where STATE is the describe "
                      "output (or MISSING) and Wi a worker's training status "
                      "(running|done|failed|absent|preempted|stopped), e.g. "
                      "ACTIVE/running,SUSPENDED,ACTIVE,ACTIVE/done,ACTIVE/done")
  return parser


def main(argv: Optional[List[str]] = None,
         out=None, sleep: Optional[Callable[[float], None]] = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  tc.check_args(parser, args, create=True, install=True, run=True)
  if args.interval < 1:
    parser.error(f"--interval: expected a positive number of seconds, "
                 f"got {args.interval}")
  if args.max_restarts < 0 or args.max_recreates < 0:
    parser.error("--max-restarts and --max-recreates must be >= 0")
  if args.simulate is not None and not args.dry_run:
    parser.error("--simulate needs --dry-run")
  kwargs = {} if sleep is None else {"sleep": sleep}
  runner = runner_lib.Runner(args.dry_run, out=out, **kwargs)
  if args.dry_run and args.simulate is None:
    print_plan(args, runner)
    return 0
  simulation = None
  if args.simulate is not None:
    try:
      simulation = Simulation(args.simulate, args.queued)
    except ValueError as e:
      parser.error(str(e))
  try:
    return Watcher(args, runner, simulation).loop()
  except ValueError as e:
    parser.error(str(e))
  except KeyboardInterrupt:
    runner.comment("watcher interrupted; training keeps running on the TPU")
    return 130


if __name__ == "__main__":
  sys.exit(main())
