"""The preemptible entry point of a recipe: a picklable submitit ``Checkpointable`` plus a signal guard.

``RecipeJob(recipe_path, config)`` holds only a path and a plain config dict, so it pickles for
submitit (parametrized modules do not pickle: the recipe builds its model inside the job). Calling
it imports the recipe script by path and runs ``recipe.run(config, job=self)``, which resumes from
the newest checkpoint in the run's folder.

Preemption (submitit sends ``SIGUSR2``, ``--signal=USR2@90``): submitit's handler calls
``job.checkpoint()`` and requeues. A handler may fire between any two bytecodes, e.g. after
``optimizer.step()`` but before ``scheduler.step()``; saving there would store a state no
uninterrupted run ever had. :class:`PreemptionGuard` therefore only records the signal, and the
training loop calls :meth:`PreemptionGuard.check` at step boundaries, which runs the original
handler there. :meth:`RecipeJob.checkpoint` saves through the callback that the running recipe
attached (:meth:`RecipeJob.attach`) and returns a fresh ``DelayedSubmission`` of the job.

Under DDP, submitit checkpoints and requeues from rank 0 only (the other ranks' handlers return);
every rank holds the same state, so rank 0's checkpoint is the run's.

Example:
    >>> import pickle
    >>> job = RecipeJob("mkopt/recipes/resnet50_imagenet.py", {"method": "baseline"})
    >>> again = pickle.loads(pickle.dumps(job))
    >>> again.config, again.recipe == job.recipe
    ({'method': 'baseline'}, True)
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

try:
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError as error:  # pragma: no cover - submitit is in the [slurm] and [dev] extras
    raise ImportError("mkopt.job needs submitit: pip install 'mkopt[slurm]'") from error

__all__ = ["RecipeJob", "PreemptionGuard", "load_recipe", "preemption_signal"]


def preemption_signal() -> int:
    """The signal submitit uses for preemption and timeouts (``SUBMITIT_PREEMPT_SIGNAL``, default ``USR2``).

    Example:
        >>> preemption_signal() in (signal.SIGUSR2, getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")))
        True
    """
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    value = getattr(signal, "SIG" + name, None) or getattr(signal, name, None)
    if value is None:
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL={name!r} is not a signal name (e.g. USR2, USR1, TERM)")
    return int(value)


class PreemptionGuard:
    """Defer the preemption signal's handler to the next :meth:`check` (a step boundary of the loop).

    Installed only when a Python handler is registered for the signal (submitit registers one in
    its jobs) and in the main thread; otherwise the guard does nothing and the signal keeps its
    usual effect.

    Example:
        >>> calls = []
        >>> previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
        >>> with PreemptionGuard() as guard:
        ...     os.kill(os.getpid(), signal.SIGUSR2)   # arrives mid-step: only recorded
        ...     recorded = (guard.pending, calls[:])
        ...     guard.check()                          # the step boundary: the handler runs now
        >>> recorded == (signal.SIGUSR2, []), calls == [signal.SIGUSR2]
        (True, True)
        >>> _ = signal.signal(signal.SIGUSR2, previous)
    """

    def __init__(self, signum: int | None = None) -> None:
        self.signum = preemption_signal() if signum is None else signum
        self.pending: int | None = None
        self._previous: Any = None
        self.active = False

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(self.signum)
        if callable(previous):
            self._previous = previous
            signal.signal(self.signum, self._record)
            self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.signal(self.signum, self._previous)
            self.active = False

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.pending = signum

    def check(self) -> None:
        """Run the deferred handler now, if the signal arrived since the last check.

        submitit's handler checkpoints, requeues and raises ``SystemExit``; on ranks other than 0
        it returns and training continues (rank 0's exit ends the job).
        """
        if self.pending is None or not self.active:
            return
        signum, self.pending = self.pending, None
        signal.signal(self.signum, self._previous)  # a second signal during the save is the original's business
        try:
            self._previous(signum, None)
        finally:
            if self.active:
                signal.signal(self.signum, self._record)


class RecipeJob(Checkpointable):
    """Run ``recipe_path``'s ``run(config, job=...)``; ``checkpoint()`` saves and resubmits the job.

    Example:
        >>> job = RecipeJob("mkopt/recipes/resnet50_imagenet.py", {"out": "/tmp/run"})
        >>> type(job.checkpoint()).__name__       # nothing running: nothing to save, just resubmit
        'DelayedSubmission'
    """

    def __init__(self, recipe: str | os.PathLike, config: dict[str, Any]) -> None:
        self.recipe = str(Path(recipe).resolve())
        self.config = config
        self._saver: Callable[[], None] | None = None

    def __call__(self) -> Any:
        return load_recipe(self.recipe).run(self.config, job=self)

    def attach(self, saver: Callable[[], None] | None) -> None:
        """Called by the running recipe: ``saver()`` writes a checkpoint of the live state (``None``: detach)."""
        self._saver = saver

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Save through the attached saver (if training is running) and return the job to resubmit."""
        if self._saver is not None:
            self._saver()
        return DelayedSubmission(type(self)(self.recipe, self.config), *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "config": self.config}  # never the live training objects

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.recipe, self.config, self._saver = state["recipe"], state["config"], None

    def __repr__(self) -> str:
        return f"RecipeJob({self.recipe!r}, out={self.config.get('out')!r})"


def load_recipe(path: str | os.PathLike) -> ModuleType:
    """Import a recipe script by path (registered as ``mkopt_recipe_<stem>``); it must define ``run``.

    Example:
        >>> load_recipe("/nonexistent/recipe.py")
        Traceback (most recent call last):
        ...
        FileNotFoundError: recipe /nonexistent/recipe.py does not exist (pass the path of a mkopt/recipes/*.py script)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist (pass the path of a mkopt/recipes/*.py script)")
    name = f"mkopt_recipe_{path.stem}"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path.resolve():
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    if not callable(getattr(module, "run", None)):
        raise AttributeError(f"recipe {path} defines no run(config, job=None) function")
    return module


