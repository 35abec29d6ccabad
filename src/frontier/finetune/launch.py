"""Launcher command lines for the finetune worker.

* Local (a workstation, CI, or inside a one-node Slurm job): one `torchrun --standalone`
  with `--nproc_per_node` processes (GPUs, or CPU processes with gloo).
* Multi-node Slurm: one `srun` task per node, each running torchrun with
  `--nnodes N --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:port`, MASTER_ADDR being the
  job's first host. DeepSpeed reads RANK/WORLD_SIZE/MASTER_ADDR/LOCAL_RANK from torchrun and
  never SLURM_* itself.

The environment: `OMP_NUM_THREADS=1`, and the BLAS thread variables alike (without it a 2-core
CPU run is ~4x slower; Snakemake's MKL_NUM_THREADS=2 leaking into the workers made the demo's
int4 lolcats fine-tune's median step 0.29-0.88 s against 0.036 s),
`DS_ACCELERATOR=cpu` when there is no CUDA (the worker then uses gloo; NCCL on GPUs).
"""
from __future__ import annotations

import os
import shlex
from typing import Optional, Sequence, Union

WORKER_MODULE = "frontier.finetune.worker"
RDZV_PORT = 29500
# thread-pool sizes a worker process must not inherit from its launcher (set to OMP_NUM_THREADS)
THREAD_VARS = ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def _module_args(module_args: Union[str, Sequence[str], None]) -> list[str]:
    if module_args is None:
        return []
    if isinstance(module_args, str):
        return shlex.split(module_args)
    return [str(a) for a in module_args]


def worker_env(base: Optional[dict] = None, *, cuda: Optional[bool] = None, nproc: int = 1) -> dict:
    """Environment for torchrun + the worker processes.

    CPU: `DS_ACCELERATOR=cpu` and `OMP_NUM_THREADS` = cores // processes (1 on a 2-core
    machine with 2 processes; oversubscribed threads make a CPU run ~4x slower); `THREAD_VARS`
    (MKL_NUM_THREADS, ...) = OMP_NUM_THREADS, whatever the launcher's environment said.
    """
    env = dict(os.environ if base is None else base)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        if env.get("DS_ACCELERATOR") == "cpu":
            del env["DS_ACCELERATOR"]
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env["DS_ACCELERATOR"] = "cpu"
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cores = os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cores // max(1, int(nproc))))
    # The BLAS pools too: torch takes its intra-op thread count from MKL_NUM_THREADS when that is
    # set, and Snakemake sets it (and OMP_NUM_THREADS) to the job's `threads` (= nproc) for the
    # launcher. Inherited, each of the 2 CPU processes ran 2 threads on 2 cores (oversubscribed).
    for var in THREAD_VARS:
        env[var] = env["OMP_NUM_THREADS"]
    # frontier.data's synthetic recall rows iterate a set of strings: their order (and so the
    # batches) depends on the hash seed. Fixed, every rank and every restart draws the same stream.
    if env.get("PYTHONHASHSEED", "random") == "random" or not env.get("PYTHONHASHSEED"):
        env["PYTHONHASHSEED"] = "0"
    env.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def local_command(nproc: int, module_args: Union[str, Sequence[str]], *, python: Optional[str] = None) -> list[str]:
    """argv of a single-node launch: `torchrun --standalone --nproc_per_node N -m worker ARGS`."""
    import sys

    py = python or sys.executable
    return [py, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", str(int(nproc)),
            "-m", WORKER_MODULE, *_module_args(module_args)]


def slurm_lines(nodes: int, gpus_per_node: int, cpus_per_task: int, mem: str, time: str,
                partition: Optional[str] = None, account: Optional[str] = None,
                module_args: Union[str, Sequence[str], None] = None, *, port: int = RDZV_PORT,
                torchrun: str = "torchrun") -> tuple[list[str], str]:
    """(#SBATCH header lines, the srun command) of a Slurm batch script running the worker.

    One task per node (`--ntasks-per-node=1`), each task a torchrun that starts
    `gpus_per_node` processes. `cpus_per_task` are the CPUs of that one task (all the
    node's processes), `mem` per node (e.g. "200G"), `time` as Slurm takes it ("04:00:00").
    """
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes and gpus_per_node must be >= 1, got {nodes}, {gpus_per_node}")
    header = [
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --mem={mem}",
        f"#SBATCH --time={time}",
    ]
    if partition:
        header.append(f"#SBATCH --partition={partition}")
    if account:
        header.append(f"#SBATCH --account={account}")
    worker = shlex.join(["-m", WORKER_MODULE, *_module_args(module_args)])
    # --overlap: inside a Snakemake job step the allocation's CPUs are held by the outer srun
    srun = (f"srun --overlap --nodes={nodes} --ntasks-per-node=1 --cpus-per-task={cpus_per_task} "
            f"--kill-on-bad-exit=1")
    if nodes == 1:
        cmd = (f"export PYTHONHASHSEED=0 && {srun} {torchrun} --standalone --nnodes 1 "
               f"--nproc_per_node {gpus_per_node} {worker}")
    else:
        # expanded by the batch script's shell on the first node, before srun starts the tasks
        master = 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"'
        cmd = (f"export PYTHONHASHSEED=0 {master} MASTER_PORT={port} && {srun} {torchrun} --nnodes {nodes} "
               f"--nproc_per_node {gpus_per_node} --rdzv_id \"$SLURM_JOB_ID\" --rdzv_backend c10d "
               f"--rdzv_endpoint \"$MASTER_ADDR:{port}\" {worker}")
    return header, cmd


def command(ft: dict, spec_path, *, cuda: bool, env: Optional[dict] = None) -> list[str]:
    """argv of the launch for a finetune config, here (local) or in the current Slurm job."""
    env = os.environ if env is None else env
    nodes, nproc = int(ft.get("nodes", 1)), int(ft["nproc"])
    if nodes == 1:
        if cuda:
            import torch

            have = torch.cuda.device_count()
            if have < nproc:
                raise RuntimeError(f"finetune.nproc={nproc} but this node has {have} GPU(s)")
        return local_command(nproc, ["--spec", str(spec_path)])
    if not env.get("SLURM_JOB_ID"):
        raise RuntimeError(f"finetune.nodes={nodes} needs a Slurm allocation (run inside an sbatch job "
                           "with --nodes and --ntasks-per-node=1)")
    _, cmd = slurm_lines(nodes, nproc, int(env.get("SLURM_CPUS_PER_TASK", "1")), "0", "0",
                         module_args=["--spec", str(spec_path)])
    return ["bash", "-c", cmd]
