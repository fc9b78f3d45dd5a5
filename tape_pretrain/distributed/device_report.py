"""What this machine offers for training: NVIDIA device detection, the CUDA problem that preflight and
launch/setup_env.sh report, the torch / CUDA / cuDNN / NCCL stack, and which SDPA kernel each of the project's
attention calls gets.

Shapes: B batch, H heads, N tokens, D head dim.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

EXPECT_GPU_VARIABLE = "TAPE_PRETRAIN_EXPECT_GPU"
"""1: this machine must train on CUDA (a problem otherwise); 0: ignore a present GPU (train on the CPU)."""

CUDA_INDEX_EXAMPLE = "https://download.pytorch.org/whl/cu128"

FUSED_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION)


def nvidia_device_evidence() -> str | None:
    """How we know an NVIDIA GPU is on this machine ('/dev/nvidia0' or nvidia-smi's first line), or None."""
    if os.path.exists("/dev/nvidia0"):
        return "/dev/nvidia0"
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "-L"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU ")]
    return f"nvidia-smi -L: {gpus[0]}" if out.returncode == 0 and gpus else None


def torch_build() -> str:
    """e.g. 'torch 2.13.0+cpu (CPU-only build, torch.version.cuda=None)' or 'torch 2.13.0+cu128 (CUDA 12.8)'."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} (CPU-only build, torch.version.cuda=None)"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda})"


def _cuda_init_error() -> str | None:
    """Why a CUDA build cannot initialise (no driver, driver too old, no visible device), in one line."""
    try:
        torch.cuda.init()
    except Exception as exc:  # torch raises RuntimeError or AssertionError depending on the cause
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def cuda_problem(environ=os.environ) -> str | None:
    """One line naming the problem when this machine should train on CUDA but torch cannot use it, else None.

    'Should' means: TAPE_PRETRAIN_EXPECT_GPU=1, or (unless it is 0) an NVIDIA device is present."""
    expect = environ.get(EXPECT_GPU_VARIABLE, "")
    if expect not in ("", "0", "1"):
        return f"{EXPECT_GPU_VARIABLE}={expect!r}: use 1 (this machine must train on CUDA) or 0 (train on the CPU)"
    if expect == "0" or torch.cuda.is_available():
        return None
    evidence = nvidia_device_evidence()
    if evidence:
        why = f"an NVIDIA GPU is present ({evidence})"
    elif expect == "1":
        why = (f"{EXPECT_GPU_VARIABLE}=1 (though no NVIDIA device is visible here: no /dev/nvidia0, no GPU in "
               "nvidia-smi -L)")
    else:
        return None
    opt_out = f"or set {EXPECT_GPU_VARIABLE}=0 to train on the CPU"
    if torch.version.cuda is None:
        index = environ.get("TORCH_INDEX_URL")
        tried = (f"; TORCH_INDEX_URL={index} was set, so pip took this wheel from its own configuration (see "
                 "find-links and extra-index-url in `pip config list`)" if index else "")
        return (f"{why}, but {torch_build()} cannot use CUDA: reinstall a CUDA build with "
                f"TORCH_INDEX_URL={CUDA_INDEX_EXAMPLE} bash launch/setup_env.sh ({opt_out}{tried})")
    reason = _cuda_init_error() or "torch.cuda.is_available() is False"
    return (f"{why}, but {torch_build()} cannot use CUDA ({reason}): check the driver (nvidia-smi shows the newest "
            "CUDA it supports) and CUDA_VISIBLE_DEVICES, or install a build for the driver's CUDA with "
            f"TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ bash launch/setup_env.sh ({opt_out})")


def model_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype the engines compute in (trainer.precision; auto = bf16 on CUDA, fp32 on CPU)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


# -- the stack ------------------------------------------------------------------------------------------------


def _cudnn_version() -> str:
    if not torch.backends.cudnn.is_available():
        return "none"
    v = torch.backends.cudnn.version()
    if v is None:
        return "none"
    major, minor, patch = (v // 10000, v // 100 % 100, v % 100) if v >= 10000 else (v // 1000, v // 100 % 10, v % 100)
    return f"{major}.{minor}.{patch}"


def _nccl_version() -> str:
    if torch.version.cuda is None or not torch.distributed.is_nccl_available():
        return "none"
    try:
        from torch.cuda import nccl

        v = nccl.version()
    except (ImportError, AttributeError, RuntimeError):
        return "none"
    return ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def stack(device: torch.device) -> dict[str, str]:
    """Versions and the device: torch, CUDA, cuDNN, NCCL, device name, compute capability ('none' on the CPU)."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda or "none", "cudnn": _cudnn_version(),
            "nccl": _nccl_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=f"{props.name} ({device}, {props.total_memory / 2**30:.1f} GiB, "
                           f"{torch.cuda.device_count()} visible)",
                    capability=f"{props.major}.{props.minor} (sm_{props.major}{props.minor})")
    else:
        info.update(device=f"cpu ({_cpu_name()}, {os.cpu_count()} cores)", capability="none")
    return info


# -- the project's attention calls -----------------------------------------------------------------------------


ATTENTION_CALLS = {
    "rope": "RoPE: q, k, v [B,H,N,D], is_causal",
    "tape_v": "TAPE A @ v (tape_attention=two_calls): the same call",
    "tape_cs": "TAPE A @ [c|s] (two_calls): value of width D",
    "tape_one_call": "TAPE A @ [v|c|s] (one_call; auto on CUDA when 2D <= 256): value of width 2D",
}


def attention_inputs(batch: int, num_heads: int, seq_len: int, head_dim: int, device: torch.device,
                     dtype: torch.dtype, requires_grad: bool = True, seed: int = 0) -> dict[str, tuple]:
    """(q, k, v) of each call in ATTENTION_CALLS, laid out as the model makes them: q and k come out of the rotary
    (a concatenation: contiguous [B,H,N,D]); v is a head split of a projection ([B,N,H,D] transposed); [c|s] is
    the layer-0 TAPE state (contiguous, cos and sin of position x theta)."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, h, n, d = batch, num_heads, seq_len, head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    q, k = randn(b, h, n, d), randn(b, h, n, d)
    v = randn(b, n, h, d).transpose(1, 2)  # [B,H,N,D], strides of a head split
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    angles = torch.arange(n, dtype=torch.float64, device=device)[:, None] * theta  # [N, D/2]
    cs = torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype).expand(b, h, n, d).contiguous()
    vcs = torch.cat((v, cs), dim=-1)  # [B,H,N,2D]
    calls = {"rope": (q, k, v), "tape_v": (q, k, v), "tape_cs": (q, k, cs), "tape_one_call": (q, k, vcs)}
    if requires_grad:
        calls = {name: tuple(t.detach().requires_grad_() for t in qkv) for name, qkv in calls.items()}
    return calls


def sdpa_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> str:
    """The backend F.scaled_dot_product_attention dispatches this call to (its own selection, the same inputs)."""
    index = torch._fused_sdp_choice(q, k, v, None, 0.0, causal, scale=None, enable_gqa=False)
    return SDPBackend(index).name


def sdpa_eligibility(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> dict[str, bool]:
    """On CUDA, which fused backends accept this call (torch.backends.cuda.can_use_*); {} on the CPU."""
    if q.device.type != "cuda":
        return {}
    from torch.backends.cuda import (
        SDPAParams,
        can_use_cudnn_attention,
        can_use_efficient_attention,
        can_use_flash_attention,
    )

    params = SDPAParams(q, k, v, None, 0.0, causal, False)
    return {"FLASH_ATTENTION": can_use_flash_attention(params, debug=False),
            "EFFICIENT_ATTENTION": can_use_efficient_attention(params, debug=False),
            "CUDNN_ATTENTION": can_use_cudnn_attention(params, debug=False)}


@dataclass
class AttentionCall:
    name: str
    description: str
    q_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    backend: str
    """What SDPA picks for this call."""
    eligible: dict[str, bool] = field(default_factory=dict)
    """CUDA only: which fused backends could run it."""


@dataclass
class DeviceReport:
    stack: dict[str, str]
    dtype: str
    attention: list[AttentionCall]


def attention_report(device: torch.device, dtype: torch.dtype, num_heads: int, head_dim: int, seq_len: int,
                     batch: int = 1) -> list[AttentionCall]:
    out = []
    for name, (q, k, v) in attention_inputs(batch, num_heads, seq_len, head_dim, device, dtype).items():
        out.append(AttentionCall(name, ATTENTION_CALLS[name], tuple(q.shape), tuple(v.shape), sdpa_choice(q, k, v),
                                 sdpa_eligibility(q, k, v)))
    return out


def device_report(device: torch.device, dtype: torch.dtype, num_heads: int, head_dim: int, seq_len: int,
                  batch: int = 1) -> DeviceReport:
    return DeviceReport(stack(device), str(dtype).removeprefix("torch."),
                        attention_report(device, dtype, num_heads, head_dim, seq_len, batch))


def run_device_report(config, device: torch.device) -> DeviceReport:
    """The report for a run config's model (trainer.seq_len, its dtype on this device), or for paper-155m at N=1024
    without one. One row per call: the backend choice does not depend on the batch size."""
    import dataclasses

    from tape_pretrain.config import ModelConfig
    from tape_pretrain.models.presets import resolve_model_config

    if config is None:
        model, seq_len, precision = resolve_model_config(ModelConfig(preset="paper-155m")), 1024, "auto"
    else:
        seq_len, precision = config.trainer.seq_len, config.trainer.precision
        # the vocabulary may come from the dataset; it plays no part in attention
        model = resolve_model_config(dataclasses.replace(config.model, vocab_size=config.model.vocab_size or 1,
                                                         max_seq_len=config.model.max_seq_len or seq_len))
    return device_report(device, model_dtype(device, precision), model.num_heads,
                         model.hidden_size // model.num_heads, seq_len)


def format_report(report: DeviceReport) -> str:
    s = report.stack
    lines = [f"stack: torch {s['torch']}, CUDA {s['cuda']}, cuDNN {s['cudnn']}, NCCL {s['nccl']}",
             f"device: {s['device']}, compute capability {s['capability']}",
             f"attention (SDPA, {report.dtype}, causal):"]
    for call in report.attention:
        eligible = ", ".join(f"{k.removesuffix('_ATTENTION').lower()}={'yes' if v else 'no'}"
                             for k, v in call.eligible.items())
        lines.append(f"  {call.name:<13} q {list(call.q_shape)} v {list(call.v_shape)}: {call.backend}"
                     + (f" ({eligible})" if eligible else "") + f"  [{call.description}]")
    if report.attention:
        from tape_pretrain.models.tape import resolve_attention_form

        *_, n, d = report.attention[0].q_shape
        device_type = "cuda" if s["device"] != "cpu" and "cpu" not in str(s["device"]).lower() else "cpu"
        form = resolve_attention_form("auto", device_type, d, n)
        where = " (on the CPU not SDPA: tape_pretrain's blocked causal attention)" if (
            form == "one_call" and device_type == "cpu") else ""
        lines.append(f"TAPE with tape_attention=auto uses {form} here{where}")
    return "\n".join(lines)


# -- accuracy of each backend against the math kernel ------------------------------------------------------------


def _max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (0 when ref is 0)."""
    scale = ref.abs().max().item()
    return (a.float() - ref).abs().max().item() / scale if scale else 0.0


def _run(backend: SDPBackend, q, k, v, grad_out):
    with warnings.catch_warnings(), sdpa_kernel([backend]):
        warnings.simplefilter("ignore")  # "... not used because ..." for every backend that declines
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # d(out) in out's own memory layout, as the model hands it (models.positional_base.attention): a kernel
        # is judged on the calls it really gets
        grads = torch.autograd.grad(out, (q, k, v), torch.empty_like(out).copy_(grad_out))
    return out, grads


def backend_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: int = 1) -> dict[str, dict]:
    """Forward and gradient error of every backend that can run this call, against the math kernel in fp32.

    Returns {backend: {"out": rel, "grad": rel}} with rel = max|x - ref| / max|ref| (the worst of dq, dk, dv for
    "grad"); "MATH" is the math kernel in the inputs' own dtype, the baseline a fused kernel is judged against.
    A backend that declines the call is absent. The reference runs one batch row at a time (its [N, N] fp32 scores
    are the memory peak)."""
    g = torch.Generator(device=q.device).manual_seed(seed)
    grad_out = torch.randn(v.shape, generator=g, device=q.device).to(v.dtype)  # d(loss)/d(out)
    reference = []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for i in range(q.shape[0]):
            row = [t[i:i + 1].detach().float().requires_grad_() for t in (q, k, v)]
            out, grads = _run(SDPBackend.MATH, *row, grad_out[i:i + 1].float())
            reference.append((out.detach(), [x.detach() for x in grads]))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    ref_out = torch.cat([r[0] for r in reference])
    ref_grads = [torch.cat([r[1][j] for r in reference]) for j in range(3)]
    del reference
    errors = {}
    for backend in (*FUSED_BACKENDS, SDPBackend.MATH):
        try:
            out, grads = _run(backend, q, k, v, grad_out)
        except RuntimeError:  # "No available kernel": this backend declines these inputs
            continue
        errors[backend.name] = {"out": _max_rel(out, ref_out),
                                "grad": max(_max_rel(a, b) for a, b in zip(grads, ref_grads))}
        del out, grads
    return errors


def main(argv: list[str]) -> int:
    """`python -m tape_pretrain.distributed.device_report --require-cuda` (launch/setup_env.sh): exit 1 with one
    error line when this machine should train on CUDA and the installed torch cannot."""
    if argv != ["--require-cuda"]:
        print("usage: python -m tape_pretrain.distributed.device_report --require-cuda", file=sys.stderr)
        return 2
    problem = cuda_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
