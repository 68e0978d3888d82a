"""Training metrics: FLOPs and MFU, metrics.jsonl, TensorBoard, the loss-curve PNG and wandb.

MFU follows PaLM (Chowdhery et al. 2022, appendix B): a token costs 6·N + 12·L·d·T_attn
FLOPs for forward + backward, N the parameters that take part in matmuls (no position table,
and no input table when the head is untied: a lookup is not a matmul), L layers, d the
model width and T_attn the keys a query sees (T for full causal attention, as PaLM counts it;
min(w, T) with a sliding window w). MFU = achieved FLOP/s ÷ peak FLOP/s of the devices used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.config import ModelConfig
from gpt2_jax.errors import notice

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity: half the datasheets'
# "with sparsity" ones), matched as substrings of `device_kind` in this order: a name that
# contains another (H100 PCIe / H100, GB200 / B200) must come first.
PEAK_FLOPS = {
    "H200 NVL": 835e12,  # NVIDIA H200 datasheet (NVL: PCIe card)
    "H200": 989e12,
    "H100 PCIe": 756e12,  # NVIDIA H100 datasheet; "NVIDIA H100 80GB HBM3" is the SXM part
    "H100 NVL": 835e12,
    "H100": 989e12,
    "GB200": 2.5e15,  # NVIDIA GB200 NVL72 datasheet, per GPU
    "B200": 2.25e15,  # NVIDIA HGX B200 datasheet, per GPU
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "TPU7x": 2307e12,  # Ironwood (Google Cloud TPU docs); JAX's device_kind is "TPU7x"
}


def flops_per_token(cfg: ModelConfig, n_matmul_params: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM convention."""
    t_attn = seq_len if cfg.attention_window is None else min(cfg.attention_window, seq_len)
    return 6.0 * n_matmul_params + 12.0 * cfg.n_layer * cfg.n_embd * t_attn


def measure_cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jitted fp32 n×n matmul on the default device (best of `repeats`)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def table_peak_flops(device_kind: str) -> float | None:
    """PEAK_FLOPS of the first entry named in `device_kind` (case-insensitive), else None."""
    return next((f for name, f in PEAK_FLOPS.items() if name.lower() in device_kind.lower()), None)


def peak_flops_per_device(override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure came from)."""
    if override:
        return float(override), "train.peak_flops"
    kind = jax.devices()[0].device_kind
    if (flops := table_peak_flops(kind)) is not None:
        return flops, f"table ({kind})"
    if jax.default_backend() == "cpu":
        return measure_cpu_matmul_flops(), "CPU matmul probe"
    return float("nan"), f"unknown device {kind!r}; set train.peak_flops"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary sibling and a rename: a crash leaves the old file or the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metrics(path: Path) -> tuple[list[tuple[str, dict]], list[int]]:
    """(line, record) pairs of a metrics.jsonl, and the numbers of lines that are not a JSON
    object (a crash mid-write tears the last one)."""
    pairs, bad = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            pairs.append((line, record))
        else:
            bad.append(number)
    return pairs, bad


class MetricsWriter:
    """Appends one JSON object per line to out_dir/metrics.jsonl (process 0 only)."""

    def __init__(self, path: Path, *, enabled: bool, resume_step: int = 0):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            pairs, bad = read_metrics(path)
            if bad:
                lines = ", ".join(map(str, bad))
                notice(f"{path}: dropped {len(bad)} unreadable line(s) (line {lines}), as a "
                       "crash mid-write leaves them")  # fmt: skip
            # On resume, drop records past the checkpoint so the curve is not duplicated.
            kept = [line for line, r in pairs if r.get("step", 0) <= resume_step]
            write_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


# metrics.jsonl fields that measure speed, not learning: TensorBoard groups them under perf/.
PERF_FIELDS = ("tokens_per_sec", "mfu", "step_time", "data_time")


def tb_tag(key: str) -> str:
    """TensorBoard tag of a metrics.jsonl field: val_loss → val/loss, moe_z_loss → moe/z_loss,
    the PERF_FIELDS → perf/…, any other → train/…."""
    for group in ("val", "moe"):
        if key.startswith(group + "_"):
            return f"{group}/{key[len(group) + 1 :]}"
    return f"perf/{key}" if key in PERF_FIELDS else f"train/{key}"


class TensorBoard:
    """The numeric fields of each record as scalars in an event file under `logdir` (process 0,
    and only when tensorboardX is installed)."""

    FLUSH_SECS = 30.0  # a log this long after the last flush flushes again

    def __init__(self, logdir: Path, *, enabled: bool, resume_step: int = 0):
        self.events, self.logdir = None, None  # logdir: where events went, None if nowhere
        if not enabled:
            return
        try:
            # SummaryWriter queues events for a thread, so its flush() leaves the latest
            # behind; EventsWriter writes them as they come and flushes them all.
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog
        except ImportError as e:
            # Silent when it is not installed, but for whoever has TensorBoard itself: they
            # are looking for these curves.
            if any(importlib.util.find_spec(m) for m in ("tensorboardX", "tensorboard")):
                notice(f"no TensorBoard scalars: {e} (pip install 'gpt2-jax[tensorboard]')")
            return
        logdir.mkdir(parents=True, exist_ok=True)
        self.events, self.logdir = EventsWriter(str(logdir / "events")), logdir
        # A resumed run redoes the steps past its checkpoint: this START makes TensorBoard hide
        # the earlier events from its step on. Fresh runs write one too, because TensorBoard
        # ignores the first START of a directory.
        start = SessionLog(status=SessionLog.START)
        self.events.write_event(Event(wall_time=time.time(), step=resume_step + 1,
                                      session_log=start))  # fmt: skip
        self.flush()

    def log(self, record: dict) -> None:
        """Each int or float field of `record` but `step`, at `record["step"]`."""
        if self.events is None:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=tb_tag(key), simple_value=value)
                  for key, value in record.items()
                  if key != "step" and isinstance(value, (int, float))]  # fmt: skip
        if values:
            event = Event(wall_time=time.time(), step=record["step"], summary=Summary(value=values))
            self.events.write_event(event)
        if time.monotonic() - self.flushed > self.FLUSH_SECS:
            self.flush()

    def flush(self) -> None:
        """Every event so far onto the disk."""
        if self.events is not None:
            self.events.flush()
            self.flushed = time.monotonic()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str = "") -> Path | None:
    """Train and validation loss against step, from metrics.jsonl."""
    if not metrics_path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for _, r in read_metrics(metrics_path)[0]]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


class Wandb:
    """wandb run on process 0, mode fixed before `wandb.init`; the run id lives in out_dir."""

    def __init__(self, mode: str, project: str, name: str | None, out_dir: Path, config: dict):
        self.run = None
        if mode == "disabled" or jax.process_index() != 0:
            return
        import wandb

        id_file = out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            mode=mode,
            project=project,
            name=name,
            id=run_id,
            resume="allow",
            dir=str(out_dir),
            config=config,
        )

    def log(self, record: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def unigram_baseline(prepared_dir: Path) -> float | None:
    """Val cross-entropy (nats/token) of the add-one-smoothed train unigram distribution."""
    try:
        train = np.memmap(prepared_dir / "train.bin", dtype=np.uint16, mode="r")
        val = np.memmap(prepared_dir / "val.bin", dtype=np.uint16, mode="r")
    except (OSError, ValueError):
        return None
    counts = np.bincount(train, minlength=65536).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean()) if len(val) else None
