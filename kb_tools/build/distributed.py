"""Knowledge-base builds on a Ray cluster: shards of (prompt, seed) pairs, each built by a worker with
the same function as a single-process build (`build.build_knowledge_base`), merged by the driver
with the KB store's merge (shards hard-linked, no latent rewritten).

    python -m kb_tools build ... --out KB --ray auto|ADDRESS|local [--workers N] [--gpus-per-worker G]

Shard KBs are written to `<KB>.ray-shards/`, which every node must see (like the KB and the
checkpoint: a shared file system). A shard is named by a hash of its pairs, so a rerun with the
same arguments plans the same shards and each resumes inside its folder (build_knowledge_base
skips what a shard already holds); shards of an earlier, different plan are merged as they are
and their pairs left out of the new plan. A worker is a Ray actor that loads the checkpoint once;
Ray restarts a dead one and retries its shard, which resumes from the shard's last commit, so
nothing is lost or sampled twice. `ray` is imported only here, only when a build asks for it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ..comfy.env import PACK_DIR
from ..core.errors import KBError
from ..store import MANIFEST, KnowledgeBase, check_kb_path, merge, merge_into
from .job import BuildJob, load_checkpoint

log = logging.getLogger(__name__)

RAY_INSTALL = 'pip install "redi-sampling[ray]"  (or: pip install "ray>=2.40")'
#: shards per worker: small enough shards that a retry redoes little and fast workers take more.
SHARDS_PER_WORKER = 4
#: how often Ray restarts a dead worker and retries its shard before the build stops.
WORKER_RETRIES = 3
#: trajectories a worker gathers before one commit to its shard (what a killed worker loses).
SHARD_COMMIT_EVERY = 16
SHARD_PREFIX = "shard-"

Pair = tuple[str, int]


def import_ray():
    """The `ray` module, or a KBError naming the install command."""
    try:
        import ray
    except ImportError:
        raise KBError(f"--ray needs the optional package 'ray', which is not installed for {sys.executable}. "
                      f"Install it with: {RAY_INSTALL}") from None
    return ray


def shards_folder(kb_path: str) -> str:
    """Where the shard KBs of a distributed build of `kb_path` live (next to it, on the same file system)."""
    return check_kb_path(kb_path).rstrip(os.sep) + ".ray-shards"


def plan_shards(todo: Sequence[Pair], n_shards: int, batch_size: int) -> list[list[Pair]]:
    """`todo` in at most `n_shards` contiguous runs of whole batches: every batch of a single-process
    build of `todo` is then a batch of exactly one shard."""
    batch_size = max(1, batch_size)
    per = max(1, math.ceil(math.ceil(len(todo) / batch_size) / max(1, n_shards))) * batch_size
    return [list(todo[i:i + per]) for i in range(0, len(todo), per)]


def shard_name(pairs: Sequence[Pair]) -> str:
    """A shard's folder name: a hash of its pairs, so the same plan finds the same folder again."""
    return SHARD_PREFIX + hashlib.sha256(json.dumps([list(p) for p in pairs], ensure_ascii=False).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- worker side

_LOADED: dict[tuple[str, bool], tuple] = {}  # the checkpoint this worker process loaded


def _model_for(job: BuildJob) -> tuple:
    key = (job.ckpt, job.cpu)
    if key not in _LOADED:
        from ..comfy.env import choose_device, ensure_comfyui

        ensure_comfyui()
        choose_device(force_cpu=job.cpu)
        _LOADED.clear()
        _LOADED[key] = load_checkpoint(job.ckpt)
    return _LOADED[key]


def build_shard(job: BuildJob, kb_path: str, shard_path: str, pairs: Sequence[Pair],
                progress: Callable[[int], None] | None = None) -> int:
    """Sample the pairs a shard KB still misses into it (resumable); return how many it holds."""
    model, encode, channels = _model_for(job)  # first: it makes ComfyUI importable
    from ..comfy import model_facts as cs
    from ..store import open_or_create
    from .builder import build_knowledge_base, kb_settings_for

    spec = job.spec(channels, sorted({p for p, _ in pairs}), pairs=pairs, commit_every=SHARD_COMMIT_EVERY)
    if os.path.isfile(os.path.join(kb_path, MANIFEST)):  # stop before sampling if the KB was built otherwise
        r = spec.recipe
        open_or_create(kb_path, kb_settings_for(model, spec, cs.schedule_sigmas(model, r.sampler, r.scheduler, r.steps)),
                       dtype=spec.dtype, index_type=spec.index_type)
    report = None if progress is None else (lambda done, total: progress(len(pairs) - total + done))
    return len(build_knowledge_base(shard_path, model, encode, spec, progress=report).kb)


class ShardBuilder:
    """One Ray worker: loads the checkpoint on its first shard and keeps it for the next ones."""

    def __init__(self, job: BuildJob):
        self.job = job

    def build(self, kb_path: str, shard_path: str, pairs: list[Pair], board) -> int:
        name = os.path.basename(shard_path)
        return build_shard(self.job, kb_path, shard_path, [tuple(p) for p in pairs], lambda n: board.report.remote(name, n))


class ProgressBoard:
    """Trajectories each shard holds or has sampled, as its worker last reported (one bar for all)."""

    def __init__(self):
        self.done: dict[str, int] = {}

    def report(self, shard: str, n: int) -> None:
        self.done[shard] = n

    def total(self) -> int:
        return sum(self.done.values())


# --------------------------------------------------------------------------- driver side


@dataclass
class RayBuildReport:
    kb: KnowledgeBase
    added: int
    already_present: int
    shards: int
    workers: int
    seconds: float

    def summary(self) -> str:
        return (f"ReDi KB {self.kb.path}: added {self.added} trajectories ({self.already_present} were already there), "
                f"{len(self.kb)} in total, {self.seconds:.1f} s on {self.workers} Ray workers ({self.shards} shards)")


def _earlier_shards(folder: str, planned: set[str], have: set[Pair]) -> tuple[list[KnowledgeBase], set[Pair]]:
    """Shard KBs of an earlier plan that still hold entries the KB lacks, and those entries.

    Shards whose entries are all in the KB were merged by a run that stopped before removing
    them: they are removed now.
    """
    kept, pending = [], set()
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if name in planned or not name.startswith(SHARD_PREFIX) or not os.path.isfile(os.path.join(path, MANIFEST)):
            continue
        kb = KnowledgeBase.open(path)
        entries = set(kb.entries)
        if entries <= have:
            shutil.rmtree(path)
        elif entries & have:
            raise KBError(f"shard {path} holds some entries the KB {os.path.dirname(folder)} already has and some it lacks; "
                          "it was not written by this build. Move it out of the way and rerun.")
        else:
            kept.append(kb)
            pending |= entries
    return kept, pending


def _connect(ray, address: str, cpus: int | None) -> None:
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(PACK_DIR), os.environ.get("PYTHONPATH", "")) if p)}
    if os.environ.get("COMFYUI_PATH"):
        env["COMFYUI_PATH"] = os.environ["COMFYUI_PATH"]
    runtime_env = {"env_vars": env}
    try:
        if address == "local":
            ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env, logging_level=logging.WARNING)
        else:
            ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise KBError(f"no Ray cluster answered at --ray {address} ({e}). Start one with `ray start --head` on this "
                      "machine (and `ray start --address HEAD:6379` on the others), or pass --ray local to run on "
                      "a private cluster on this machine.") from None


def _task_error(ray, e: Exception, shard: str) -> KBError:
    cause = getattr(e, "cause", None)
    if isinstance(cause, KBError):
        return KBError(str(cause))
    if isinstance(e, ray.exceptions.RayActorError):
        return KBError(f"the worker building {shard} died {WORKER_RETRIES + 1} times (last: {e}). What it committed is kept; "
                       "check the workers' memory and logs, then rerun the same command to resume.")
    return KBError(f"building {shard} failed on a Ray worker: {cause or e}. Rerun the same command to resume.")


def build_on_ray(kb_path: str, job: BuildJob, prompts: Sequence[str], *, address: str = "auto", workers: int = 0,
                 gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, local_cpus: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> RayBuildReport:
    """Build the KB at `kb_path` for prompts x job.seeds on a Ray cluster; resumable, see the module docstring.

    workers: 0 = as many as the cluster's CPUs (GPUs when gpus_per_worker > 0) allow.
    """
    start = time.perf_counter()
    ray = import_ray()
    root = check_kb_path(kb_path)
    pairs = [(p, int(s)) for p in prompts for s in job.seeds]
    final = KnowledgeBase.open(root) if os.path.isfile(os.path.join(root, MANIFEST)) else None
    have = set(final.entries) if final is not None else set()
    todo = [p for p in pairs if p not in have]
    folder = shards_folder(root)
    _connect(ray, address, local_cpus)
    try:
        resources = ray.cluster_resources()
        if not workers:
            per = gpus_per_worker or cpus_per_worker
            workers = max(1, int(resources.get("GPU" if gpus_per_worker else "CPU", 1) // per))
        plan = plan_shards(todo, workers * SHARDS_PER_WORKER, job.batch_size)
        earlier, pending = _earlier_shards(folder, {shard_name(s) for s in plan}, have)
        shards = [(os.path.join(folder, shard_name(s)), [p for p in s if p not in pending]) for s in plan]
        shards = [(path, s) for path, s in shards if s]
        os.makedirs(folder, exist_ok=True)
        board = ray.remote(ProgressBoard).options(num_cpus=0).remote()
        actor = ray.remote(ShardBuilder).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                                 max_restarts=WORKER_RETRIES, max_task_retries=WORKER_RETRIES)
        pool = [actor.remote(job) for _ in range(min(workers, len(shards)))]
        queue, running = list(shards), {}
        base, shown = len(pending), -1
        while queue or running:
            while queue and pool:
                path, s = queue.pop(0)
                w = pool.pop()
                running[w.build.remote(root, path, s, board)] = (w, path)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in ready:
                w, path = running.pop(ref)
                try:
                    ray.get(ref)
                except Exception as e:  # a task's error arrives wrapped by Ray: name the shard and the fix
                    raise _task_error(ray, e, path) from None
                pool.append(w)
            done = base + ray.get(board.total.remote())
            if progress is not None and done != shown:
                progress(done, len(todo))
                shown = done
    finally:
        ray.shutdown()

    sources = earlier + [KnowledgeBase.open(path) for path, _ in shards]
    sources = [kb for kb in sources if len(kb)]
    if sources:
        final = merge_into(final, sources) if final is not None else merge(root, sources, exist_ok=True)
    elif final is None:
        raise KBError(f"nothing was built for {root}: no prompts x seeds to sample.")
    for kb in sources:  # merged: the KB holds hard links to their shards, these folders are no longer needed
        shutil.rmtree(kb.path)
    if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)
    if progress is not None:
        progress(len(todo), len(todo))
    return RayBuildReport(final, len(todo), len(pairs) - len(todo), len(shards), workers,
                          time.perf_counter() - start)
