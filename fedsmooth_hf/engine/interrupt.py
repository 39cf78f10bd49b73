"""Ctrl-C during a federation: stop within one training step, keep no partial round, say how to resume.

While :class:`~fedsmooth_hf.engine.rounds.RoundEngine` runs a federation in one process, the first
SIGINT (Ctrl-C) or SIGTERM only sets a flag. :class:`InterruptCallback` answers it the way
``transformers`` ends a loop, ``control.should_training_stop`` at the end of the current optimizer
step, and at the next round event (that client's end, a round's start) raises
:class:`FederationInterrupted`: the interrupted round is never aggregated, merged or saved. The
round engine then prints which ``round-<k>`` checkpoint to resume from and the command that does it,
and ``FederatedTrainer.train`` raises it on (a ``KeyboardInterrupt``, so a script stops as after any
Ctrl-C). A second Ctrl-C acts as it would without any of this: ``KeyboardInterrupt`` at once. The
handlers are there only while the federation runs; the previous ones are put back after.

SIGTERM is handled too because ``accelerate launch`` answers Ctrl-C by sending its child SIGTERM
(SIGKILL 5 s later): the child then hears the terminal's SIGINT first and the launcher's SIGTERM
second, and keeps stopping gracefully. A signal set to be ignored (a ``nohup`` or background job) stays
ignored. Several processes (data-parallel local rounds, client-parallel, a Flower federation) keep
the default: each would stop at a different step and wait forever for the others.

The command: a script registers its own command line with :func:`set_resume_command` (the recipes do,
their ``--resume_from_checkpoint`` flag), and the hint is that line with the flag set to the checkpoint,
under ``accelerate launch`` the launcher's whole line; without one it is the Python call,
``trainer.train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from .callbacks import FederatedCallback
from .sequential import SequentialExecutor

__all__ = ["FederationInterrupted", "InterruptCallback", "set_resume_command", "resume_command", "RESUME_FLAG"]

RESUME_FLAG = "--resume_from_checkpoint"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: (command line as run, its resume flag), registered by :func:`set_resume_command`
_registered: tuple[list[str], str] | None = None


class FederationInterrupted(KeyboardInterrupt):
    """Raised by ``FederatedTrainer.train`` after a Ctrl-C (or SIGTERM) stopped the federation.

    Args:
        round: the 1-based round that was running, nothing of it aggregated; ``None``: every round was done.
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
        checkpoint: the ``round-<k>`` folder to resume from (the last one this run wrote), or ``None``.
        command: what resumes the run (the command line, or the Python call).
    """

    def __init__(self, round: int | None, signal_name: str, checkpoint: Path | None = None,
                 command: str | None = None):
        super().__init__(round, signal_name)
        self.round, self.signal_name, self.checkpoint, self.command = round, signal_name, checkpoint, command

    def __str__(self) -> str:
        when = "after the last round" if self.round is None else f"in round {self.round}, before its aggregation"
        where = f"resume from {self.checkpoint}" if self.checkpoint else "no checkpoint to resume from"
        return f"stopped by {self.signal_name} {when}; {where}"


def set_resume_command(argv: Sequence[str] | None, flag: str = RESUME_FLAG) -> None:
    """Registers the command line that runs this process, so an interrupted run names its own resume command.

    Args:
        argv: the program and its arguments as run (``[sys.argv[0], *arguments]``); ``None`` forgets it.
        flag: the option that takes a ``round-<k>`` checkpoint folder (its value is replaced, or it is appended).
    """
    global _registered
    _registered = None if argv is None else (list(argv), flag)


def _parent_command() -> list[str]:
    """The parent process's command line (Linux ``/proc``; elsewhere empty)."""
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except (OSError, UnicodeDecodeError):
        return []


def _launcher_prefix(script: str, parent: list[str] | None = None) -> list[str]:
    """``[accelerate, launch, <its options>]`` when ``accelerate launch`` started this process, else the interpreter.

    Args:
        script: the script as this process got it (``sys.argv[0]``), as the launcher passed it on.
        parent: the parent's command line (default: read from ``/proc``): the child of ``accelerate launch``
            sees only the script, the launcher's own options are the parent's.
    """
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd() + os.sep) else sys.executable
    parent = _parent_command() if parent is None else parent
    for i, arg in enumerate(parent[:-1]):
        if Path(arg).name == "accelerate" and parent[i + 1] == "launch" and script in parent[i + 2:]:
            return parent[i:parent.index(script, i + 2)]
    return [python]


def _with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag`` set to ``value``: an existing ``flag X`` / ``flag=X`` is dropped, the new one appended."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return [*out, flag, value]


def resume_command(checkpoint: Path | None) -> str:
    """What resumes from ``checkpoint`` (``None``: what runs the federation again from where this run started).

    The registered command line with its resume flag set (under ``accelerate launch``, the launcher's line),
    else the Python call.
    """
    if _registered is None:
        return "trainer.train()" if checkpoint is None else f"trainer.train(resume_from_checkpoint={str(checkpoint)!r})"
    argv, flag = _registered
    if checkpoint is not None:
        argv = _with_flag(argv, flag, str(checkpoint))
    return shlex.join(_launcher_prefix(argv[0]) + argv)


def _say(text: str) -> None:
    """Writes to stderr's file descriptor: safe inside a signal handler, even one that landed mid-``print``."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class InterruptCallback(FederatedCallback):
    """The first SIGINT/SIGTERM ends the local round after its current optimizer step and the federation
    at the next round event, without aggregating the round (module docstring).

    Installed by the round engine for one federation (:meth:`install`, :meth:`uninstall`).
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    # ------------------------------------------------------------------ signals
    def install(self) -> bool:
        """Takes over SIGINT and SIGTERM (from the main thread only; ignored signals stay ignored).
        Returns whether any handler was installed."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in _SIGNALS:
            previous = signal.getsignal(sig)
            if previous in (signal.SIG_IGN, None):  # ignored, or handled outside Python: not ours to change
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return bool(self._previous)

    def uninstall(self) -> None:
        """Puts the previous handlers back."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        signal.signal(signum, self._previous.pop(signum))  # the same signal again: as before (Ctrl-C aborts at once)
        if self.requested:  # the launcher's SIGTERM after the terminal's SIGINT: already stopping
            return
        self.signal_name = signal.Signals(signum).name
        again = "Ctrl-C" if signum == signal.SIGINT else "the same signal"
        _say(f"\n[fedsmooth_hf] {self.signal_name}: stopping after the current training step, before the round's "
             f"aggregation ({again} again aborts at once)\n")

    @classmethod
    def for_run(cls, trainer, executor) -> InterruptCallback | None:
        """A callback with its handlers installed, for a federation in one process (else ``None``: the default)."""
        if not isinstance(executor, SequentialExecutor) or trainer.args.world_size != 1:
            return None
        callback = cls()
        return callback if callback.install() else None

    def check(self, round_number: int | None) -> None:
        """Raises :class:`FederationInterrupted` once a signal came (``round_number`` ``None``: after the last)."""
        if self.requested:
            raise FederationInterrupted(round_number, self.signal_name)

    # ------------------------------------------------------------------ events
    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_training_stop = True  # Trainer's own stop: the loop ends after this step

    def on_round_begin(self, args, state, control, round, clients, **kwargs):
        self.check(round)

    def on_client_begin(self, args, state, control, round, client, **kwargs):
        self.check(round)

    def on_client_end(self, args, state, control, round, client, metrics, **kwargs):
        self.check(round)


def stop_message(stop: FederationInterrupted, num_rounds: int, save_rounds: int, start_round: int) -> str:
    """What the round engine prints when it stops: the round left out, the checkpoint and the command."""
    if stop.round is None:
        lines = [f"[fedsmooth_hf] stopped by {stop.signal_name} after the last of {num_rounds} rounds."]
    else:
        lines = [f"[fedsmooth_hf] stopped by {stop.signal_name} in round {stop.round} of {num_rounds}, before its "
                 f"aggregation: nothing of round {stop.round} is kept."]
    if stop.checkpoint is not None:
        done = int(stop.checkpoint.name.rsplit("-", 1)[-1])
        lines.append(f"[fedsmooth_hf] resume from {stop.checkpoint} ({done} of {num_rounds} rounds done) with:")
    elif start_round > 0:
        lines.append(f"[fedsmooth_hf] this run wrote no checkpoint after the round-{start_round} it resumed from; "
                     "resume from that one again with:")
    else:
        first = save_rounds or num_rounds  # save_rounds=0: after the last round only
        why = "save_rounds=-1 keeps none" if save_rounds < 0 else f"the first comes after round {first}"
        lines.append(f"[fedsmooth_hf] no round checkpoint yet ({why}); the same seed gives the same run from the "
                     "start:")
    lines.append(f"    {stop.command}")
    return "\n".join(lines)
