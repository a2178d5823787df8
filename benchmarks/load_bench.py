"""Load benchmark (issue 3): vllm-gds's reader against the loaders users would pick instead.

Runs on the GPU machine (no vLLM needed). One process per GPU; every rank
writes its own checkpoint with the project's shard writer (4 KiB-aligned
safetensors files), then each loader is timed to "all tensors in GPU memory
and synchronized", destination allocation included:

  ceiling          pinned host memory -> GPU copy of the same bytes (best of 1 and 4 streams)
  safetensors      safetensors.torch.load_file(device="cuda:i"), file by file
  fastsafetensors  SafeTensorsFileLoader(nogds=True)
  instanttensor    instanttensor.safe_open(files, device=i), no process group (each rank its files)
  vllm-gds         vllm_gds.io.read_files, checksums off and on (verified on the GPU): the automatic
                   engine (staged on the compat path), kvikio's own compat path beside it, and any
                   --alternatives (ENGINE:THREADSxTASK_MiB[xSLOT_MiB])

First load in a fresh process (what a server that loads once pays: kvikio's import,
its thread pool, pinning the ring or bounce buffers): one new process per row, the
CUDA context made before the timing, with and without the ring pinned beforehand
(the loader pins it while vLLM builds the model), beside InstantTensor's first load.

Warm: files on tmpfs (/dev/shm). Cold: rank 0's files copied to disk, page
cache dropped before each run and shown cold (page residency via kvikio's
mincore helper), beside a parallel `dd iflag=direct` of the same files.
Then all GPUs at once, each rank its own files: aggregate (all bytes over
the time to the slowest rank's end) and per rank, against all GPUs copying
pinned memory at once; memory other processes hold on each GPU (stray CUDA
contexts) read through NVML. Every loader's result is checked against the
manifest checksums after its timing.

    python3 benchmarks/load_bench.py [--gib-per-rank 16] [--ranks N] [--repeats 3] [--sweep]
    python3 benchmarks/load_bench.py --render OUT/load_results.json   # RESULTS.md section

Prints a table last, writes load_results.json and load_bench.png to $OUT.

Why one file of ~900 lines: every rank is a spawned process that runs rank_main from this
module (multiprocessing's spawn start method re-imports it), and the parent and the ranks share
its loaders, probes and checkpoint writer. Its sections, in order: checkpoint, measurement
helpers, loaders, the rank process, the parent, the report.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from _source_tree import ROOT  # this tree's vllm_gds importable (benchmarks/_source_tree.py)

GiB = 1 << 30
MiB = 1 << 20


# --------------------------------------------------------------------------- checkpoint


def layer_shapes(hidden=4096, inter=14336, kv=1024):
    """One Llama-3-8B-like decoder layer: (name, shape)."""
    return [
        ("input_layernorm.weight", (hidden,)),
        ("self_attn.q_proj.weight", (hidden, hidden)),
        ("self_attn.k_proj.weight", (kv, hidden)),
        ("self_attn.v_proj.weight", (kv, hidden)),
        ("self_attn.o_proj.weight", (hidden, hidden)),
        ("post_attention_layernorm.weight", (hidden,)),
        ("mlp.gate_proj.weight", (inter, hidden)),
        ("mlp.up_proj.weight", (inter, hidden)),
        ("mlp.down_proj.weight", (hidden, inter)),
    ]


def make_tensors(gib: float, device, seed: int):
    """bf16 layers of random bits until ``gib`` GiB: real shapes, incompressible data."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    budget, out, layer = int(gib * GiB), [], 0
    per_layer = sum(2 * torch.Size(s).numel() for _, s in layer_shapes())
    while budget >= per_layer or not out:
        for name, shape in layer_shapes():
            t = torch.randint(-32768, 32767, shape, dtype=torch.int16, device=device, generator=gen)
            out.append((f"model.layers.{layer}.{name}", t.view(torch.bfloat16)))
        budget -= per_layer
        layer += 1
    return out


def write_checkpoint(out_dir: Path, rank: int, world: int, gib: float, file_gib: float, device):
    from vllm_gds.shards.writer import write_rank

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = make_tensors(gib, device, seed=1234 + rank)
    shards = write_rank(out_dir, tensors, tp_rank=rank, pp_rank=0, tensor_parallel_size=world,
                        max_file_bytes=int(file_gib * GiB))
    del tensors
    return shards


# --------------------------------------------------------------------------- measurement helpers


class GpuMemorySampler:
    """Peak of NVML's used memory on one GPU while a loader runs (covers every allocator)."""

    def __init__(self, nvml_index: int, period=0.002):
        self.index, self.period = nvml_index, period
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
        except Exception:
            self._nvml = None

    def used(self) -> int:
        if self._nvml is None:
            return 0
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def __enter__(self):
        self.base = self.used()
        self.peak = self.base
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.used())


def page_residency(paths) -> tuple[int, int]:
    import kvikio

    cached = total = 0
    for p in paths:
        c, t = kvikio.get_page_cache_info(str(p))
        cached += c
        total += t
    return cached, total


def drop_page_cache(paths) -> str:
    os.sync()
    how = "drop_caches"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        how = "fadvise"
    import kvikio

    for p in paths:  # both: drop_caches may be refused in a container
        kvikio.drop_file_page_cache(str(p))
    return how


def parallel_dd(paths, bs="64M") -> float:
    start = time.perf_counter()
    procs = [subprocess.Popen(["dd", f"if={p}", "of=/dev/null", f"bs={bs}", "iflag=direct"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for p in paths]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"dd failed: {err.decode()[-300:]}")
    return time.perf_counter() - start


# --------------------------------------------------------------------------- loaders (run in a rank)


def _sync(device):
    import torch

    torch.cuda.synchronize(device)


def load_vllm_gds(shards, root: Path, device, options, verify: bool, ranks_on_node: int = 1):
    import torch

    from vllm_gds.io.reader import FileRead, ReadTarget, read_files
    from vllm_gds.shards import dtypes

    tensors, reads = {}, []
    t0 = time.perf_counter()
    for f in shards.files:
        targets = []
        for e in f.tensors:
            t = torch.empty(e.shape, dtype=dtypes.torch_dtype(e.dtype), device=device)
            tensors[e.name] = t
            targets.append(ReadTarget(e.offset, t, name=e.name, checksum=e.checksum if verify else None))
        reads.append(FileRead(root / f.path, tuple(targets), f.size))
    alloc_seconds = time.perf_counter() - t0
    stats = read_files(reads, options, device, ranks_on_node=ranks_on_node)
    return tensors, {"mode": stats.mode, "alloc_seconds": alloc_seconds, "reader_seconds": stats.seconds,
                     **stats.detail}, None


def load_safetensors(paths, device):
    from safetensors.torch import load_file

    tensors = {}
    for p in paths:
        tensors.update(load_file(str(p), device=str(device)))
    _sync(device)
    return tensors, {}, None


def load_instanttensor(paths, device, **kw):
    from instanttensor import safe_open

    tensors = {}
    with safe_open([str(p) for p in paths], framework="pt", device=device.index, **kw) as f:
        for name, t in f.tensors():
            tensors[name] = t
    _sync(device)
    return tensors, {}, None


def load_fastsafetensors(paths, device):
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    loader = SafeTensorsFileLoader(SingleGroup(), device=str(device), nogds=True)
    loader.add_filenames({0: [str(p) for p in paths]})
    fb = loader.copy_files_to_device()
    tensors = {k: fb.get_tensor(k) for k in loader.get_keys()}
    _sync(device)

    def close():
        fb.close()
        loader.close()

    return tensors, {}, close


def check_loaded(tensors, shards) -> str:
    """Every manifest tensor present with the right checksum (computed on the GPU)."""
    import torch

    from vllm_gds.checksum import checksum_tensor, format_checksum

    entries = [e for f in shards.files for e in f.tensors]
    sums = []
    for e in entries:
        t = tensors.get(e.name)
        if t is None:
            return f"missing {e.name}"
        sums.append(checksum_tensor(t.contiguous()))
    got = torch.stack(sums).cpu().tolist()
    bad = [e.name for e, v in zip(entries, got) if format_checksum(v) != e.checksum]
    return "ok" if not bad else f"{len(bad)} tensors differ, e.g. {bad[0]}"


def pinned_ceiling(device, nbytes: int, streams: int) -> float:
    """Seconds to copy ``nbytes`` from a 1 GiB pinned buffer into fresh GPU memory."""
    import torch

    chunk = min(GiB, nbytes)
    src = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    src.fill_(7)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ss = [torch.cuda.Stream(device) for _ in range(streams)]
    dst[:MiB].copy_(src[:MiB])  # warm-up
    _sync(device)
    start = time.perf_counter()
    piece = chunk // streams
    for k, off in enumerate(range(0, nbytes, piece)):
        n = min(piece, nbytes - off)
        with torch.cuda.stream(ss[k % streams]):
            dst[off:off + n].copy_(src[(off % chunk):(off % chunk) + n], non_blocking=True)
    _sync(device)
    seconds = time.perf_counter() - start
    del src, dst
    torch.cuda.empty_cache()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    return seconds


# --------------------------------------------------------------------------- first load in a fresh process


def fresh_main(rank, cfg, shards, cmd) -> dict:
    """One load as the first thing a new process does after making its CUDA context."""
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    try:
        import torch

        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        torch.empty(1, device=device)  # the context exists in a server before the loader runs
        root = Path(cfg["warm_dir"]) / f"rank{rank}"
        paths = [root / f.path for f in shards.files]
        before = {}
        if cmd["loader"] == "vllm-gds":
            from vllm_gds.io import staged
            from vllm_gds.io.reader import ReadOptions, prewarm

            opts = ReadOptions(**cmd.get("options", {}))
            if cmd.get("prewarm"):
                t = time.perf_counter()
                before["prewarm_engine"] = prewarm(paths, opts, device)
                staged.wait_prewarmed()
                before["prewarm_seconds"] = time.perf_counter() - t
            t0 = time.perf_counter()
            tensors, detail, close = load_vllm_gds(shards, root, device, opts, cmd.get("verify", False))
        else:
            t0 = time.perf_counter()
            tensors, detail, close = load_instanttensor(paths, device, **cmd.get("options", {}))
        _sync(device)
        t1 = time.perf_counter()
        return {"t0": t0, "t1": t1, "nbytes": shards.nbytes, "detail": _plain({**detail, **before}),
                "correct": check_loaded(tensors, shards), "pid": os.getpid()}
    except Exception as e:
        import traceback

        return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}


def run_fresh(rank, cfg, shards, cmd) -> dict:
    """fresh_main in a new interpreter (a rank process is a daemon: it cannot fork children)."""
    import pickle
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
        pickle.dump((rank, cfg, shards, cmd), f)
    try:
        proc = subprocess.run([sys.executable, __file__, "--fresh-child", f.name], capture_output=True,
                              text=True, timeout=300)
    finally:
        os.unlink(f.name)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("FRESH ")]
    if not lines:
        return {"error": f"fresh child exited {proc.returncode}", "trace": (proc.stdout + proc.stderr)[-1500:]}
    return json.loads(lines[-1][len("FRESH "):])


# --------------------------------------------------------------------------- rank process


def rank_main(rank, world, cfg, commands, results, barrier):
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    import torch

    from vllm_gds.io.reader import ReadOptions

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    torch.empty(1, device=device)  # the context, before the baseline memory reading
    warm_dir = Path(cfg["warm_dir"]) / f"rank{rank}"
    cold_dir = Path(cfg["cold_dir"]) if cfg.get("cold_dir") else None
    shards = None
    held = None

    def reply(**kw):
        results.put({"rank": rank, **kw})

    while True:
        cmd = commands.get()
        op = cmd["op"]
        if op == "quit":
            break
        if rank not in cmd.get("ranks", range(world)):
            reply(op=op, skipped=True)
            continue
        together = len(cmd.get("ranks", range(world))) > 1
        try:
            if op == "write":
                t0 = time.perf_counter()
                shutil.rmtree(warm_dir, ignore_errors=True)
                shards = write_checkpoint(warm_dir, rank, world, cfg["gib_per_rank"], cfg["file_gib"], device)
                torch.cuda.empty_cache()
                reply(op=op, seconds=time.perf_counter() - t0, nbytes=shards.nbytes,
                      files=[str(warm_dir / f.path) for f in shards.files])
            elif op == "release":
                if held is not None and held[1] is not None:
                    held[1]()
                held = None
                torch.cuda.empty_cache()
                reply(op=op)
            elif op == "ceiling":
                if together:
                    barrier.wait(timeout=120)
                t0 = time.perf_counter()
                seconds = pinned_ceiling(device, shards.nbytes, cmd["streams"])
                reply(op=op, t0=t0, t1=t0 + seconds, nbytes=shards.nbytes, streams=cmd["streams"])
            elif op == "copy_cold":
                cold_dir.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                srcs = [warm_dir / f.path for f in shards.files]
                threads = [threading.Thread(target=shutil.copyfile, args=(s, cold_dir / s.name)) for s in srcs]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                os.sync()
                reply(op=op, seconds=time.perf_counter() - t0)
            elif op == "dd":
                paths = [cold_dir / Path(f.path).name for f in shards.files]
                how = drop_page_cache(paths)
                before = page_residency(paths)
                seconds = parallel_dd(paths)
                reply(op=op, seconds=seconds, nbytes=sum(p.stat().st_size for p in paths),
                      drop=how, resident_before=before, resident_after=page_residency(paths))
            elif op == "load":
                held = None
                torch.cuda.empty_cache()
                loader = cmd["loader"]
                where = cold_dir if (cmd.get("cold") or cmd.get("disk")) else warm_dir
                paths = [where / Path(f.path).name for f in shards.files]
                extra = {}
                if cmd.get("cold"):
                    extra["drop"] = drop_page_cache(paths)
                if cmd.get("cold") or cmd.get("disk"):
                    extra["resident_before"] = page_residency(paths)
                sampler = GpuMemorySampler(rank)
                if together:
                    barrier.wait(timeout=120)
                with sampler:
                    t0 = time.perf_counter()
                    if loader == "vllm-gds":
                        opts = ReadOptions(**cmd.get("options", {}))
                        tensors, detail, close = load_vllm_gds(shards, where, device, opts, cmd.get("verify", False),
                                                               len(cmd.get("ranks", range(world))))
                    elif loader == "safetensors":
                        tensors, detail, close = load_safetensors(paths, device)
                    elif loader == "instanttensor":
                        tensors, detail, close = load_instanttensor(paths, device, **cmd.get("options", {}))
                    elif loader == "fastsafetensors":
                        tensors, detail, close = load_fastsafetensors(paths, device)
                    else:
                        raise ValueError(loader)
                    _sync(device)
                    t1 = time.perf_counter()
                if cmd.get("cold") or cmd.get("disk"):
                    extra["resident_after"] = page_residency(paths)
                held = (tensors, close)
                weights = sum(t.numel() * t.element_size() for t in tensors.values())
                correct = check_loaded(tensors, shards) if cmd.get("check", True) else "unchecked"
                reply(op=op, loader=loader, label=cmd.get("label", loader), t0=t0, t1=t1,
                      nbytes=shards.nbytes, detail=_plain(detail), correct=correct,
                      gpu_extra=max(0, sampler.peak - sampler.base - weights), pid=os.getpid(), **extra)
            elif op == "fresh":
                r = run_fresh(rank, cfg, shards, cmd)
                if "error" in r:
                    raise RuntimeError(f"{r['error']}\n{r.get('trace', '')}")
                reply(op=op, loader=cmd["loader"], label=cmd.get("label"), gpu_extra=0, **r)
            elif op == "driver_probe":
                from vllm_gds.io.gds_env import kvikio_driver_view

                reply(op=op, view=kvikio_driver_view(device), pid=os.getpid())
            elif op == "sweep_read_only":
                reply(op=op, **read_only_probe(shards, warm_dir, cmd["threads"], cmd["task"]))
            elif op == "mmap_register":
                reply(op=op, **mmap_register_probe(warm_dir / shards.files[0].path, device))
            else:
                raise ValueError(op)
        except Exception as e:
            import traceback

            reply(op=op, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:],
                  loader=cmd.get("loader"), label=cmd.get("label", cmd.get("loader")))
            if together and barrier.broken:
                barrier.reset()


def _plain(d):
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in d.items()}


def read_only_probe(shards, root, threads, task):
    """Host side alone: parallel preadv of the rank's files into pinned buffers, no copy."""
    import itertools

    from vllm_gds.io.pinned import PinnedBuffers

    paths = [root / f.path for f in shards.files]
    jobs = [(i, off, min(task, p.stat().st_size - off)) for i, p in enumerate(paths)
            for off in range(0, p.stat().st_size, task)]
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    import torch

    bufs = PinnedBuffers(threads, task, pin=True, device=torch.device("cuda", torch.cuda.current_device()))
    order = itertools.count()

    def work(k):
        view = bufs.view(k)
        while True:
            j = next(order)
            if j >= len(jobs):
                return
            i, off, n = jobs[j]
            os.preadv(fds[i], [view[:n]], off)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    seconds = time.perf_counter() - t0
    bufs.close()
    for fd in fds:
        os.close(fd)
    total = sum(n for _, _, n in jobs)
    return {"threads": threads, "task": task, "seconds": seconds, "gb_per_s": total / seconds / 1e9}


def mmap_register_probe(path, device):
    """Can the page cache itself be pinned (cudaHostRegister on a file mmap) and copied from?"""
    import mmap

    import torch

    size = min(os.path.getsize(path), 2 * GiB)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    src = torch.frombuffer(mm, dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    t0 = time.perf_counter()
    err = int(cudart.cudaHostRegister(src.data_ptr(), size, 8))  # cudaHostRegisterReadOnly
    t1 = time.perf_counter()
    out = {"register_error": err, "register_gb_per_s": size / (t1 - t0) / 1e9}
    if err == 0:
        dst = torch.empty(size, dtype=torch.uint8, device=device)
        t2 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        out["copy_gb_per_s"] = size / (time.perf_counter() - t2) / 1e9
        out["is_pinned"] = bool(src.is_pinned())
        t3 = time.perf_counter()
        cudart.cudaHostUnregister(src.data_ptr())
        out["unregister_seconds"] = time.perf_counter() - t3
        del dst
    del src
    return out


# --------------------------------------------------------------------------- parent


class Ranks:
    def __init__(self, world, cfg):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.world = world
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(world)]
        self.barrier = ctx.Barrier(world)
        self.procs = [ctx.Process(target=rank_main, args=(r, world, cfg, self.commands[r], self.results, self.barrier),
                                  daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, op, ranks=None, timeout=400, **kw):
        import queue

        ranks = list(range(self.world)) if ranks is None else ranks
        for q in self.commands:
            q.put({"op": op, "ranks": ranks, **kw})
        replies, deadline = [], time.monotonic() + timeout
        while len(replies) < self.world:
            try:
                replies.append(self.results.get(timeout=5))
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"{op}: ranks {dead or 'all'} died or timed out")
        replies = sorted((r for r in replies if not r.get("skipped")), key=lambda r: r["rank"])
        for r in replies:
            if "error" in r:
                log(f"  rank {r['rank']} {op} {kw.get('label', kw.get('loader', ''))}: {r['error']}")
        return replies

    def close(self):
        for q in self.commands:
            q.put({"op": "quit"})
        for p in self.procs:
            p.join(timeout=30)


def gpu_count() -> int:
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetCount()


def gpu_processes() -> dict:
    """{nvml index: {pid: used bytes}} for every GPU (NVML makes no CUDA context)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            out[i] = {p.pid: int(p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)}
        return out
    except Exception as e:
        return {"error": str(e)}


def stray_memory(procs: dict, rank_pids: dict) -> dict:
    """Per GPU: bytes held there by bench ranks other than the GPU's own rank."""
    if "error" in procs:
        return procs
    out = {}
    for gpu, by_pid in procs.items():
        out[gpu] = sum(b for pid, b in by_pid.items() if pid in rank_pids and rank_pids[pid] != gpu)
    return out


LOG: list[str] = []


def log(msg):
    print(msg, flush=True)
    LOG.append(msg)


def gbps(r):
    return r["nbytes"] / (r["t1"] - r["t0"]) / 1e9


def aggregate(replies):
    ok = [r for r in replies if "error" not in r]
    if len(ok) != len(replies) or not ok:
        return None
    total = sum(r["nbytes"] for r in ok)
    span = max(r["t1"] for r in ok) - min(r["t0"] for r in ok)
    return {"gb_per_s": total / span / 1e9, "seconds": span, "nbytes": total,
            "per_rank": [round(gbps(r), 2) for r in ok],
            "slowest_rank_seconds": max(r["t1"] - r["t0"] for r in ok)}


def machine_info():
    info = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count()}
    try:
        info["gpus"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                       "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        info["gpus"] = "?"
    from importlib.metadata import PackageNotFoundError, version

    # Versions from metadata: importing a loader's extension could touch the GPU from this process.
    for mod, dist in (("torch", "torch"), ("kvikio", "kvikio-cu13"), ("instanttensor", "instanttensor"),
                      ("fastsafetensors", "fastsafetensors"), ("safetensors", "safetensors")):
        try:
            info[mod] = version(dist)
        except PackageNotFoundError:
            info[mod] = "missing"
    from vllm_gds.io import gds_env

    info["nvidia_fs"] = gds_env.nvidia_fs_loaded()
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib-per-rank", type=float, default=16)
    ap.add_argument("--file-gib", type=float, default=4)
    ap.add_argument("--ranks", type=int, default=0, help="GPUs for the all-at-once run (0: all visible)")
    ap.add_argument("--warm-dir", default="/dev/shm/vllm-gds-bench")
    ap.add_argument("--cold-dir", default="/var/tmp/vllm-gds-bench-cold")
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="also try pipeline thread/task sizes")
    ap.add_argument("--alternatives", nargs="*", default=[],
                    metavar="[ENGINE:]THREADSxTASK[xSLOT]|auto[+pin[MiB]|+nopin][+verify]",
                    help="one GPU warm: rows of an engine (staged or kvikio, default kvikio) with these threads "
                         "x task MiB (x slot MiB, staged), or its automatic sizes, beside the automatic choice; "
                         "+pin / +pin256: the staged engine with the page pinner (256 MiB runs), +nopin without, "
                         "+verify: checksums verified. E.g. staged:12x2 kvikio:24x4 staged:auto+nopin "
                         "staged:auto+pin128 staged:auto+pin256+verify")
    ap.add_argument("--no-fresh", action="store_true", help="skip the first-load-in-a-new-process rows")
    ap.add_argument("--safetensors", action="store_true", help="also time safetensors load_file (slow)")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
    ap.add_argument("--render", help="print the RESULTS.md section for a load_results.json")
    ap.add_argument("--fresh-child", help=argparse.SUPPRESS)  # internal: one first load (run_fresh)
    args = ap.parse_args()
    if args.fresh_child:
        import pickle

        with open(args.fresh_child, "rb") as f:
            print("FRESH " + json.dumps(fresh_main(*pickle.load(f)), default=str), flush=True)
        return
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())))
        return

    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = args.ranks or gpu_count()  # the parent never makes a CUDA context
    info = machine_info()
    log(f"machine: {info}")
    from vllm_gds.io import gds_env

    cold_dir = None
    if not args.no_cold:
        Path(args.cold_dir).mkdir(parents=True, exist_ok=True)
        mount = gds_env.mount_of(args.cold_dir)
        if mount and mount.fstype not in ("tmpfs", "ramfs"):
            cold_dir = args.cold_dir
            info["cold_fs"] = f"{mount.fstype} on {mount.source}"
        else:
            log(f"cold: {args.cold_dir} is on {mount.fstype if mount else '?'}; no cold runs")
    cfg = {"warm_dir": args.warm_dir, "cold_dir": cold_dir, "gib_per_rank": args.gib_per_rank,
           "file_gib": args.file_gib}
    res = {"info": info, "config": vars(args), "world": world, "single": {}, "multi": {}, "cold": {},
           "fresh": {}, "sweep": [], "stray": {}}
    save = lambda: (out / "load_results.json").write_text(json.dumps(res, indent=1, default=str))
    ranks = Ranks(world, cfg)
    try:
        bench(ranks, world, args, res, save, cold_dir)
    finally:
        save()
        ranks.close()
        (out / "load_bench.log").write_text("\n".join(LOG) + "\n")
        shutil.rmtree(args.warm_dir, ignore_errors=True)
        if cold_dir:
            shutil.rmtree(cold_dir, ignore_errors=True)
    try:
        plot(res, out / "load_bench.png")
    except Exception as e:
        log(f"plot failed: {e}")
    print_table(res)


# The loaders timed on one GPU and on all GPUs at once: (row label, how to run it).
PEERS = [
    ("vllm-gds", dict(loader="vllm-gds")),
    ("vllm-gds, checksums verified", dict(loader="vllm-gds", verify=True)),
    ("instanttensor", dict(loader="instanttensor")),
    ("vllm-gds, kvikio engine", dict(loader="vllm-gds", options={"engine": "kvikio"})),
    ("fastsafetensors (nogds)", dict(loader="fastsafetensors")),
]
# One new process per row: the first load a server makes.
FRESH = [
    ("vllm-gds, first load in a new process", dict(loader="vllm-gds")),
    ("vllm-gds, first load, ring pinned before (as the loader does while vLLM builds the model)",
     dict(loader="vllm-gds", prewarm=True)),
    ("vllm-gds, kvikio engine, first load in a new process", dict(loader="vllm-gds", options={"engine": "kvikio"})),
    ("instanttensor, first load in a new process", dict(loader="instanttensor")),
]


def alternative(spec: str):
    """'staged:16x2x16' (threads x task MiB x slot MiB), 'kvikio:24x4', '12x4' (kvikio), 'staged:auto'
    (the engine's automatic sizes); suffixes '+pin' / '+pin256' (the page pinner on, automatic or
    256 MiB runs), '+nopin' (off), '+verify' (checksums verified)."""
    engine, _, rest = spec.rpartition(":")
    engine = engine or "kvikio"
    sizes, *flags = rest.lower().split("+")
    options = {"engine": engine}
    label = f"vllm-gds, {engine}"
    if sizes != "auto":
        nums = [int(x) for x in sizes.split("x")]
        options.update(num_threads=nums[0], task_size=nums[1] * MiB)
        label += f" {nums[0]} threads x {nums[1]} MiB"
        if len(nums) > 2:
            options["slot_size"] = nums[2] * MiB
            label += f", {nums[2]} MiB slots"
    verify = False
    for flag in flags:
        if flag == "verify":
            verify = True
        elif flag == "nopin":
            options["pin_page_cache"] = False
        elif flag.startswith("pin") and (flag[3:] == "" or flag[3:].isdigit()):
            options["pin_page_cache"] = True
            if flag[3:]:
                options["pin_run_size"] = int(flag[3:]) * MiB
        else:
            raise SystemExit(f"--alternatives {spec}: unknown suffix +{flag} (pin, pinMiB, nopin, verify)")
        label += f" +{flag}"
    return label, dict(loader="vllm-gds", options=options, verify=verify)


def bench(ranks, world, args, res, save, cold_dir):
    t = time.perf_counter()
    w = ranks.run("write")
    res["write"] = [{k: r.get(k) for k in ("rank", "seconds", "nbytes", "files", "error")} for r in w]
    if any("error" in r for r in w):
        log(f"write failed: {w}")
        return
    log(f"wrote {sum(r['nbytes'] for r in w) / GiB:.1f} GiB in {time.perf_counter() - t:.1f} s "
        f"({len(w[0]['files'])} files per rank)")
    save()
    rank_pids = {}

    def timed(label, op="load", ranks_=None, repeats=1, **kw):
        best = None
        spread = []
        for _ in range(repeats):
            replies = ranks.run(op, ranks=ranks_, label=label, **kw)
            if op == "load":
                for r in replies:
                    rank_pids[r.get("pid")] = r["rank"]
            agg = aggregate(replies)
            if agg is not None:
                spread.append(round(agg["gb_per_s"], 2))
            if agg is not None and (best is None or agg["gb_per_s"] > best["agg"]["gb_per_s"]):
                best = {"agg": agg, "replies": replies}
            if op == "load" and repeats > 1:
                ranks.run("release", ranks=ranks_)
        if best is None:
            return {"error": [r.get("error") for r in replies if "error" in r]}
        r0 = best["replies"][0]
        row = {**best["agg"], "label": label, "correct": sorted({r.get("correct", "") for r in best["replies"]}),
               "gpu_extra_mib": max(r.get("gpu_extra", 0) for r in best["replies"]) / MiB,
               "detail": r0.get("detail", {}), "all_gb_per_s": None, "repeats_gb_per_s": spread}
        for k in ("resident_before", "resident_after", "drop"):
            if k in r0:
                row[k] = r0[k]
        log(f"  {label:<34} {row['gb_per_s']:7.2f} GB/s  {row['seconds']:.3f} s  per rank {row['per_rank']}  "
            f"check {row['correct']}  gpu extra {row['gpu_extra_mib']:.0f} MiB  {row.get('detail', '')}")
        return row

    single = [0]
    log("== one GPU, warm (tmpfs)")
    for streams in (1, 4):
        res["single"][f"ceiling_{streams}"] = timed(f"pinned copy, {streams} stream(s)", op="ceiling",
                                                    ranks_=single, repeats=2, streams=streams)
    alternatives = [alternative(a) for a in args.alternatives]
    if args.sweep:
        alternatives.append(("vllm-gds, pinned pipeline engine", dict(loader="vllm-gds", options={
            "engine": "pipeline", "num_threads": 12, "task_size": 8 * MiB})))
    for label, kw in PEERS + alternatives:
        res["single"][label] = timed(label, ranks_=single, repeats=args.repeats, **kw)
        ranks.run("release", ranks=single)
        save()
    if args.safetensors:
        res["single"]["safetensors"] = timed("safetensors load_file", ranks_=single, loader="safetensors")
        ranks.run("release", ranks=single)
        save()
    if not args.no_fresh:
        log("== one GPU, warm, the first load in a new process")
        res["fresh"] = {}
        for label, kw in FRESH:
            res["fresh"][label] = timed(label, op="fresh", ranks_=single, **kw)
            save()

    if args.sweep:
        log("== sweep (one GPU, warm): the host side alone, page-cache pinning, threads x task size")
        for threads in (8, 16):
            r = ranks.run("sweep_read_only", ranks=single, threads=threads, task=16 * MiB)[0]
            log(f"  preadv into pinned buffers only, {threads} threads x 16 MiB: {r.get('gb_per_s', r.get('error'))}")
            res["sweep"].append({"kind": "pread-only", **{k: v for k, v in r.items() if k != "trace"}})
        r = ranks.run("mmap_register", ranks=single)[0]
        log(f"  cudaHostRegister of a tmpfs mapping, then one copy: {r}")
        res["sweep"].append({"kind": "mmap-register", **r})
        for threads in (4, 8, 16):
            for task in (16, 64):
                opts = {"num_threads": threads, "task_size": task * MiB}
                row = timed(f"vllm-gds t{threads} task{task}M", ranks_=single, loader="vllm-gds",
                            options=opts, check=False)
                ranks.run("release", ranks=single)
                res["sweep"].append({"kind": "in-place", "threads": threads, "task_mib": task,
                                     "gb_per_s": row.get("gb_per_s"), "detail": row.get("detail")})
        for threads, task in ((12, 8), (16, 16)):
            opts = {"num_threads": threads, "task_size": task * MiB, "pin_page_cache": False,
                    "num_buffers": threads}
            row = timed(f"vllm-gds ring t{threads} task{task}M", ranks_=single, loader="vllm-gds",
                        options=opts, check=False)
            ranks.run("release", ranks=single)
            res["sweep"].append({"kind": "ring", "threads": threads, "task_mib": task,
                                 "gb_per_s": row.get("gb_per_s"), "detail": row.get("detail")})
        save()

    if world > 1:
        log(f"== {world} GPUs at once, warm, each rank its own files")
        for streams in (1, 4):
            res["multi"][f"ceiling_{streams}"] = timed(f"pinned copy x{world}, {streams} stream(s)",
                                                       op="ceiling", repeats=2, streams=streams)
        multi = list(PEERS)
        if args.sweep:
            for threads, task in ((8, 16), (8, 64), (16, 64)):
                multi.append((f"vllm-gds t{threads} task{task}M",
                              dict(loader="vllm-gds", options={"num_threads": threads, "task_size": task * MiB})))
        for label, kw in multi:
            res["multi"][label] = timed(label, repeats=args.repeats, **kw)
            if label == "vllm-gds":  # while the tensors are resident: who holds memory where
                replies = ranks.run("load", label=label + " (stray check)", check=False, **kw)
                for r in replies:
                    rank_pids[r.get("pid")] = r["rank"]
                procs = gpu_processes()
                res["stray"]["vllm-gds"] = {"processes": {str(k): v for k, v in procs.items()},
                                            "other_ranks_bytes": stray_memory(procs, rank_pids)}
                log(f"  memory held on each GPU by other ranks: {res['stray']['vllm-gds']['other_ranks_bytes']}")
            ranks.run("release")
            save()

    if cold_dir:
        log("== one GPU, cold (page cache dropped, disk)")
        r = ranks.run("copy_cold", ranks=single)
        log(f"  copied rank 0's files to {cold_dir} in {r[0].get('seconds', 0):.1f} s")
        r = ranks.run("dd", ranks=single)[0]
        if "error" not in r:
            res["cold"]["dd"] = {"gb_per_s": r["nbytes"] / r["seconds"] / 1e9, "seconds": r["seconds"],
                                 "resident_before": r["resident_before"], "resident_after": r["resident_after"],
                                 "drop": r["drop"], "label": "parallel dd iflag=direct"}
            log(f"  parallel dd iflag=direct: {res['cold']['dd']['gb_per_s']:.2f} GB/s, resident before "
                f"{r['resident_before']}, after {r['resident_after']} ({r['drop']})")
        for label, kw in [("vllm-gds", dict(loader="vllm-gds", cold=True)),
                          ("vllm-gds, kvikio engine (buffered reads)",
                           dict(loader="vllm-gds", cold=True, options={"engine": "kvikio"})),
                          ("vllm-gds, page cache warm (ext4)", dict(loader="vllm-gds", disk=True)),
                          *([("vllm-gds, O_DIRECT", dict(loader="vllm-gds", cold=True, options={"direct_io": True}))]
                            if args.sweep else []),
                          ("instanttensor", dict(loader="instanttensor", cold=True))]:
            group = res["cold"] if kw.get("cold") else res["single"]
            group[label] = timed(label + (" (cold)" if kw.get("cold") else ""), ranks_=single, **kw)
            ranks.run("release", ranks=single)
            save()

    if world > 1:
        log("== does asking kvikio for the cuFile driver view make contexts on other GPUs?")
        r = ranks.run("driver_probe", ranks=[world - 1])
        procs = gpu_processes()
        for x in r:
            rank_pids[x.get("pid")] = x["rank"]
        res["stray"]["after_driver_probe"] = {"view": r[0].get("view") if r else None,
                                              "processes": {str(k): v for k, v in procs.items()},
                                              "other_ranks_bytes": stray_memory(procs, rank_pids)}
        log(f"  {res['stray']['after_driver_probe']}")


# --------------------------------------------------------------------------- report


def _rows(res):
    s, m, c = res["single"], res["multi"], res["cold"]

    def g(d, k):
        v = d.get(k) or {}
        return v.get("gb_per_s")

    ceiling1 = max(filter(None, [g(s, "ceiling_1"), g(s, "ceiling_4")]), default=None)
    ceilingn = max(filter(None, [g(m, "ceiling_1"), g(m, "ceiling_4")]), default=None)
    it1, itn = g(s, "instanttensor"), g(m, "instanttensor")
    rows = []
    for k, v in s.items():
        if k.startswith("ceiling") or not isinstance(v, dict) or "gb_per_s" not in v:
            continue
        rows.append(("1 GPU warm", v["label"], v["gb_per_s"], it1, ceiling1, v))
    for k, v in m.items():
        if k.startswith("ceiling") or not isinstance(v, dict) or "gb_per_s" not in v:
            continue
        rows.append((f"{res['world']} GPUs warm", v["label"], v["gb_per_s"], itn, ceilingn, v))
    fresh = res.get("fresh", {})
    itf = g(fresh, "instanttensor, first load in a new process")
    for k, v in fresh.items():
        if isinstance(v, dict) and "gb_per_s" in v:
            rows.append(("1 GPU 1st load", v["label"], v["gb_per_s"], itf, ceiling1, v))
    dd = g(c, "dd")
    itc = g(c, "instanttensor")
    for k, v in c.items():
        if isinstance(v, dict) and "gb_per_s" in v:
            rows.append(("1 GPU cold", v["label"], v["gb_per_s"], itc, dd, v))
    return rows, ceiling1, ceilingn, dd


def target_lines(res) -> list[str]:
    """Issue 17's targets, as /work/shared/checks/load_targets.py judges them, for this run."""
    rows, c1, _, dd = _rows(res)
    s, c = res["single"], res["cold"]
    get = lambda d, k: (d.get(k) or {}).get("gb_per_s")
    ours, it, ver = get(s, "vllm-gds"), get(s, "instanttensor"), get(s, "vllm-gds, checksums verified")
    checks = []
    if ours and it and c1:
        checks += [("1 GPU warm x InstantTensor", ours / it, 1.15), ("1 GPU warm x pinned ceiling", ours / c1, 0.88)]
    if ver and it:
        checks.append(("checksums verified x InstantTensor", ver / it, 1.10))
    cold, itc = get(c, "vllm-gds"), get(c, "instanttensor")
    if cold and dd:
        checks.append(("cold x dd O_DIRECT", cold / dd, 0.95))
    if cold and itc:
        checks.append(("cold x InstantTensor cold", cold / itc, 1.0))
    lines = [f"{name}: {val:.2f} (>= {lim:.2f}) {'ok' if val >= lim else 'SHORT'}" for name, val, lim in checks]
    lines.append(f"load targets: {sum(val >= lim for _, val, lim in checks)}/{len(checks)} hold")
    return lines


def print_table(res):
    rows, c1, cn, dd = _rows(res)
    print()
    print(f"card: {res['info'].get('gpus', '?').splitlines()[0] if res['info'].get('gpus') else '?'}; "
          f"date {res['info']['date']}; {res['config']['gib_per_rank']} GiB per rank")
    print(f"ceilings: pinned copy 1 GPU {c1 or 0:.2f} GB/s; all {res['world']} GPUs {cn or 0:.2f} GB/s; "
          f"cold parallel dd iflag=direct {dd or 0:.2f} GB/s")
    print(f"{'run':<14} {'loader':<52} {'GB/s':>7} {'x InstantT':>10} {'x ceiling':>9}  repeats / per rank")
    for where, label, v, it, ceil, row in rows:
        print(f"{where:<14} {label[:52]:<52} {v:7.2f} {v / it if it else 0:10.2f} {v / ceil if ceil else 0:9.2f}  "
              f"{row.get('repeats_gb_per_s') or ''} {row.get('per_rank', '') if res['world'] > 1 else ''}")
    print("(cold rows: 'x ceiling' is the ratio to the parallel dd iflag=direct read; first-load rows: "
          "'x InstantT' against InstantTensor's first load)")
    for line in pinner_lines(res):
        print(line)
    for line in target_lines(res):
        print(line)


def pinner_lines(res) -> list[str]:
    """Where the page pinner ran: the bytes each way and the pinner's own rate (best repeat)."""
    lines = []
    for group in ("single", "multi"):
        for v in res.get(group, {}).values():
            d = v.get("detail") if isinstance(v, dict) else None
            if not d or "pin_bytes" not in d:
                continue
            lines.append(f"  {v['label'][:52]}: ring {d.get('ring_bytes', 0) / GiB:.2f} GiB, pinner "
                         f"{d['pin_bytes'] / GiB:.2f} GiB in {d.get('pin_runs_done')} runs of "
                         f"{d.get('pin_run', 0) >> 20} MiB x {d.get('pin_runs')} at a time, {d.get('pin_gb_per_s', 0):.2f} GB/s "
                         f"(register {d.get('pin_register_seconds', 0):.3f} s, unregister "
                         f"{d.get('pin_unregister_seconds', 0):.3f} s of {d.get('pin_seconds', 0):.3f}){'; ' + d['pin_refused'] if d.get('pin_refused') else ''}")
    return (["page pinner:"] + lines) if lines else []


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, c1, cn, dd = _rows(res)
    groups = [("1 GPU warm", c1), ("1 GPU 1st load", c1), (f"{res['world']} GPUs warm", cn), ("1 GPU cold", dd)]
    groups = [(g, c) for g, c in groups if any(r[0] == g for r in rows)]
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 5), squeeze=False)
    for ax, (group, ceil) in zip(axes[0], groups):
        sel = [r for r in rows if r[0] == group]
        ax.barh([r[1] for r in sel], [r[2] for r in sel], color=["C0" if "vllm-gds" in r[1] else "C7" for r in sel])
        if ceil:
            ax.axvline(ceil, color="C3", ls="--", label="pinned copy ceiling" if "cold" not in group else "dd iflag=direct")
            ax.legend(loc="lower right")
        ax.set_title(group)
        ax.set_xlabel("GB/s")
    fig.suptitle(f"Load into GPU memory: {res['info'].get('gpus', '').splitlines()[0] if res['info'].get('gpus') else ''}"
                 f", {res['info']['date']}, {res['config']['gib_per_rank']} GiB per rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render_markdown(res) -> str:
    rows, c1, cn, dd = _rows(res)
    info = res["info"]
    card = info.get("gpus", "?").splitlines()
    lines = [
        f"Run {info['date']} on {len(card)}x {card[0].split(',')[0] if card else '?'} "
        f"({info.get('cpus')} CPUs; torch {info.get('torch')}, kvikio {info.get('kvikio')}, "
        f"InstantTensor {info.get('instanttensor')}, fastsafetensors {info.get('fastsafetensors')}; "
        f"nvidia-fs {'loaded' if info.get('nvidia_fs') else 'absent: cuFile compat mode only, no real GDS'}). "
        f"{res['config']['gib_per_rank']:g} GiB of bf16 per rank in {res['config']['file_gib']:g} GiB shard files "
        "written by the project's shard writer. Times run to all tensors in GPU memory and synchronized, "
        "destination allocation included; every row's bytes were checked against the manifest checksums "
        "after timing. Best of the repeats.",
        "",
        f"Ceilings: pinned host-to-device copy {c1 or 0:.1f} GB/s on one GPU, {cn or 0:.1f} GB/s on all "
        f"{res['world']} at once; cold: parallel `dd iflag=direct` {dd or 0:.2f} GB/s.",
        "",
        "| run | loader | GB/s | x InstantTensor | x ceiling | per rank GB/s | GPU MiB beyond weights "
        "| pinned host MiB per rank |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for where, label, v, it, ceil, row in rows:
        pinned = (row.get("detail") or {}).get("pinned_bytes")
        pinned = f"{pinned / MiB:.0f}" if isinstance(pinned, (int, float)) else "n/m"
        lines.append(f"| {where} | {label} | {v:.2f} | {v / it if it else 0:.2f} | {v / ceil if ceil else 0:.2f} | "
                     f"{', '.join(str(x) for x in row.get('per_rank', []))} | {row.get('gpu_extra_mib', 0):.0f} "
                     f"| {pinned} |")
    lines.append("")
    lines.append("Cold rows: 'x ceiling' is the ratio to the parallel dd read of the same files.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
