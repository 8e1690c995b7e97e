"""`layertime slurm-check`: can a SLURM profile's jobs ever start on this cluster, and if not, which field to change.

A profile made for a GPU cluster (8 CPUs, 64 GiB, one GPU per job) is refused in seconds by a small
or CPU-only one, in SLURM's words (`Requested node configuration is not available`) that name no
field of the profile. This check asks SLURM what its partitions offer (`sinfo`: CPUs and memory per
node, GPUs, time limit) and compares each kind of job the profile submits (GPU jobs, scoring jobs,
big-memory jobs) against the largest node of its partition, naming the profile field and the most it
can be; then `sbatch --test-only` of the job script itself says whether SLURM would start it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from flows.clusters import SlurmSettings, _api_url, _gib, _script, job_kwargs


@dataclass(frozen=True)
class Partition:
    """One node configuration of a partition, as `sinfo -e` reports it."""

    name: str
    cpus: int
    memory_mb: int
    gres: str  # 'gpu:2', 'gpu:a100:4(S:0-1)', '(null)'
    time_limit_s: int | None  # None: no limit
    available: bool
    nodes: int


@dataclass(frozen=True)
class Asked:
    """What one kind of job asks for, with the profile field behind each request."""

    kind: str
    partition: str | None
    partition_field: str
    cpus: int
    cpus_field: str | None  # None: not a profile field (big-memory jobs take one CPU)
    memory_gib: int
    memory_field: str
    gpus: int
    gpu_type: str | None
    walltime_s: int


def partitions() -> tuple[list[Partition], str | None]:
    """The cluster's partitions (one entry per node configuration) and its default partition."""
    out = _sinfo("-h", "-e", "-o", "%R|%c|%m|%G|%l|%a|%D")
    found = []
    for line in out.splitlines():
        name, cpus, memory, gres, limit, available, nodes = line.split("|")
        found.append(Partition(name, int(cpus.rstrip("+")), int(memory.rstrip("+")), gres, _seconds(limit),
                               available == "up", int(nodes)))  # fmt: skip
    default = next((p.rstrip("*") for p in _sinfo("-h", "-o", "%P").split() if p.endswith("*")), None)
    return found, default


def asked(settings: SlurmSettings) -> list[Asked]:
    """What each kind of job the profile submits asks for."""
    score_partition = settings.score_partition or settings.partition
    where = "score_partition" if settings.score_partition else "partition"
    kinds = [Asked("gpu", settings.partition, "partition", settings.cpus, "cpus", _gib(settings.memory), "memory",
                   settings.gpus, settings.gpu_type, settings.walltime_seconds)]  # fmt: skip
    if settings.score_jobs:
        kinds.append(Asked("score", score_partition, where, settings.score_cpus, "score_cpus",
                           _gib(settings.score_memory), "score_memory", 0, None, settings.walltime_seconds))  # fmt: skip
    if settings.bigmem_jobs:
        kinds.append(Asked("bigmem", score_partition, where, 1, None, _gib(settings.bigmem_memory), "bigmem_memory",
                           0, None, settings.walltime_seconds))  # fmt: skip
    return kinds


def problems(job: Asked, found: list[Partition], default: str | None) -> list[str]:
    """Each profile field that keeps this kind of job from ever starting, with the most it can be."""
    name = job.partition or default
    nodes = [p for p in found if p.name == name]
    if not nodes:
        known = ", ".join(sorted({p.name for p in found})) or "none"
        what = f"no partition {name!r}" if name else "no default partition"
        return [
            f"{job.partition_field}: {what}; the cluster has: {known}"
            + (f" (default {default})" if default else "")
        ]
    said = []
    if not any(p.available for p in nodes):
        said.append(f"{job.partition_field}: partition {name} is not up")
    if job.cpus > max(p.cpus for p in nodes):
        most = max(p.cpus for p in nodes)
        field = job.cpus_field or "cpus"
        said.append(
            f"{field}: {job.cpus} CPUs asked, the nodes of {name} have at most {most}: set {field}: {most} or less"
        )
    most_gib = max(p.memory_mb for p in nodes) // 1024
    if job.memory_gib > most_gib:
        said.append(f"{job.memory_field}: {job.memory_gib}G asked, the nodes of {name} have at most "
                    f"{max(p.memory_mb for p in nodes)} MB: set {job.memory_field}: {most_gib}G or less")  # fmt: skip
    if job.gpus:
        with_gpus = [p for p in nodes if _has_gpu(p.gres, job.gpu_type)]
        if not with_gpus:
            kind = f"{job.gpu_type} GPUs" if job.gpu_type else "GPUs"
            said.append(f"gpus: {job.gpus} GPU asked, the nodes of {name} have no {kind} (gres {_gres(nodes)}): "
                        "set gpus: 0 and device: cpu (the slurm-cpu profile), or a partition with GPUs")  # fmt: skip
    limits = [p.time_limit_s for p in nodes]
    if None not in limits and job.walltime_s > max(limits):
        said.append(f"walltime: {job.walltime_s} s asked, partition {name} allows at most {max(limits)} s: "
                    f"set walltime: {_hms(max(limits))} or less")  # fmt: skip
    return said


def check(settings: SlurmSettings, profile_name: str) -> tuple[bool, list[str]]:
    """Whether SLURM would start every kind of job of the profile; the report's lines."""
    found, default = partitions()
    lines, ok = [], True
    api = _api_url(required=False)
    for job in asked(settings):
        name = job.partition or default
        nodes = [p for p in found if p.name == name]
        offer = "; ".join(f"{p.nodes} node(s): {p.cpus} CPUs, {p.memory_mb} MB, gres {p.gres}, "
                          f"time limit {_hms(p.time_limit_s)}" for p in nodes) or "nothing"  # fmt: skip
        lines.append(f"{job.kind} jobs: partition {name or '(none)'} offers {offer}")
        said = problems(job, found, default)
        lines += [f"  change {line}" for line in said]
        verdict, words = _test_only(_script(job_kwargs(settings, api, job.kind)))
        lines.append(f"  sbatch --test-only: {words}")
        ok = ok and verdict and not said
    fix = "its jobs can start here" if ok else "its jobs cannot start here: change the fields named above"
    lines.append(f"profile {profile_name}: {fix}")
    return ok, lines


def sbatch_test_only(script: str, prefix: str) -> subprocess.CompletedProcess:
    """`sbatch --test-only` of a job script (written to a temporary file named `prefix`...): SLURM's
    verdict without submitting. OSError or TimeoutExpired when sbatch cannot be run."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix=prefix) as f:
        f.write(script)
        f.flush()
        return subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)


def _test_only(script: str) -> tuple[bool, str]:
    try:
        out = sbatch_test_only(script, "layertime-slurm-check-")
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot run sbatch: {e}"
    return out.returncode == 0, " ".join((out.stderr or out.stdout).split())


def _sinfo(*args: str) -> str:
    try:
        out = subprocess.run(["sinfo", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"cannot ask SLURM (sinfo): {e}") from None
    if out.returncode != 0:
        raise RuntimeError(f"sinfo failed: {out.stderr.strip()}")
    return out.stdout


def _has_gpu(gres: str, gpu_type: str | None) -> bool:
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and (gpu_type is None or gpu_type in parts[1:-1]):
            return True
    return False


def _gres(nodes: list[Partition]) -> str:
    return ", ".join(sorted({p.gres for p in nodes}))


def _seconds(limit: str) -> int | None:
    """sinfo's time limit ('infinite', '1-00:00:00', '30:00') in seconds; None when unlimited."""
    if limit.lower() in ("infinite", "unlimited", "n/a"):
        return None
    return SlurmSettings(walltime=limit).walltime_seconds


def _hms(seconds: int | None) -> str:
    if seconds is None:
        return "none"
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text
