"""Linear layers, norms and the decode step whose every output row depends on its own input row only
(serve/kernel.cpp).

The server decodes many requests in one batch. With BLAS matrix products a row's results change in
their last bits with the number of rows beside it (the library picks its kernel by shape), which is
enough to change a sampled token now and then: the same seeded request would not give the same text
alone and under load. The kernel here fixes the order of every sum by the input width alone, so a
row's output is bit for bit the same in a batch of any size, at either precision:

- fp32: the exported weights, sums in a fixed order;
- int8: weights rounded to int8 with one scale per output, and each input row rounded to int8 with
  a scale of its own; the products are summed in int32, which is exact, so the order cannot matter.
  Decoding a token reads every weight once: int8 weights are a quarter of fp32's memory traffic,
  and an AVX2 integer multiply-add does twice the products of a float one (16 against 8).

The kernel is compiled with the system C++ compiler on first use and cached under ~/.cache.
"""

import copy
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
from pathlib import Path

import torch
import torch.nn as nn

from model.errors import PipelineError
from model.gpt import KVCache

SOURCE = Path(__file__).with_name("kernel.cpp")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
PRECISIONS = ("int8", "fp32")
# The KV cache's numbers at each precision. Decoding many long sequences reads the cache more than the
# weights (the ryangpt shape holds 7.4 MB of fp32 keys and values per sequence at position 480, against
# 15 MB of int8 weights shared by the whole batch), so int8 keeps them in 16-bit floats (relative error
# 2^-11, far inside int8's); fp32 rounds nothing.
CACHE_DTYPES = {"int8": torch.float16, "fp32": torch.float32}


class KernelBuildError(PipelineError):
    """The C++ compiler is missing or failed."""


def _cpu_flags():
    """The CPU's feature flags: a library built with -march=native is only valid on CPUs that have them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build():
    compiler = os.environ.get("CXX", "c++")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(), _cpu_flags().encode()])
    ).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dvc-gpt"
    library = cache / f"rowwise-{key}.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f"{library.name}.{os.getpid()}.tmp"
        try:
            subprocess.run(
                [compiler, *FLAGS, str(SOURCE), "-o", str(partial)], check=True, capture_output=True, text=True
            )
        except FileNotFoundError:
            raise KernelBuildError(
                f"serving needs a C++ compiler to build {SOURCE.name} and found no '{compiler}' "
                f"(install g++, or name one in $CXX)"
            ) from None
        except subprocess.CalledProcessError as error:
            raise KernelBuildError(f"'{compiler}' failed to build {SOURCE}:\n{error.stderr.strip()}") from None
        partial.replace(library)  # atomic: a concurrent build never loads a half-written library
    lib = ctypes.CDLL(str(library))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.linear_f32.argtypes = [pointer, size, size, pointer, pointer, size, ctypes.c_int]
    lib.linear_i8.argtypes = [pointer, pointer, size, size, pointer, pointer, size, ctypes.c_int]
    lib.rms_norm.argtypes = [pointer, size, ctypes.c_float, pointer, pointer, size]
    lib.decode_step.argtypes = (
        [pointer] * 3
        + [size] * 5
        + [ctypes.c_float]
        + [pointer] * 5
        + [size]
        + [pointer] * 2
        + [size] * 3
        + [pointer, ctypes.c_int]
    )
    return lib


_library = None


def library():
    global _library
    if _library is None:
        _library = _build()
    return _library


class RowwiseLinear(nn.Module):
    """A bias-free nn.Linear on CPU whose rows are computed independently (see the module docstring)."""

    def __init__(self, weight, precision, threads=1):
        super().__init__()
        self.threads = threads  # the kernel's, for each call
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        weight = weight.detach().float().contiguous()
        self.out_features, self.in_features = weight.shape
        sizes = (self.out_features, self.in_features)
        if precision == "int8":
            # Symmetric, one scale per output row: the largest weight of the row maps to 127.
            scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
            self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8))
            self.register_buffer("scale", scale.contiguous())
            self.compute = functools.partial(library().linear_i8, self.weight.data_ptr(), self.scale.data_ptr(), *sizes)
        else:
            self.register_buffer("weight", weight)
            self.compute = functools.partial(library().linear_f32, self.weight.data_ptr(), *sizes)

    def forward(self, x):
        # Decoding calls this some forty times per token, so it does little: the weight's arguments are bound
        # once, above, and the output is allocated in its final shape.
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        out = torch.empty(*x.shape[:-1], self.out_features)
        self.compute(x.data_ptr(), out.data_ptr(), x.numel() // self.in_features, self.threads)
        return out


class RowwiseRMSNorm(nn.Module):
    """nn.RMSNorm in serve/kernel.cpp: torch's takes some 50 microseconds for one row of 320 on a small CPU,
    more than the linear layer after it, and decoding normalises 13 rows per token."""

    def __init__(self, norm):
        super().__init__()
        self.register_buffer("weight", norm.weight.detach().float().contiguous())
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.compute = functools.partial(library().rms_norm, self.weight.data_ptr(), self.weight.numel(), eps)

    def forward(self, x):
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        out = torch.empty_like(x)
        self.compute(x.data_ptr(), out.data_ptr(), x.numel() // self.weight.numel())
        return out


class RowwiseDecoder:
    """The decode step of a rowwise_model, one new token per sequence, in one kernel call (serve/kernel.cpp's
    decode_step: the model's forward pass for one token with a cache, every row independent of the others).

    From Python the same step is some forty module calls and as many small tensors per token, which on a
    small model cost as much as the arithmetic. Prompts still go through the model itself (several tokens a
    step, per-sequence attention in KVCache), into the same `cache`.
    """

    def __init__(self, model, cache, threads=1):
        self.model, self.cache = model, cache  # held: the kernel reads their memory
        self.threads = threads  # the kernel's, for each step
        config = model.config
        self.vocab_size = config.vocab_size

        def projection(linear):
            return [linear.weight.data_ptr(), linear.scale.data_ptr() if hasattr(linear, "scale") else 0]

        layers = []
        for block in model.layers:
            attn, mlp = block.attn, block.mlp
            layers += [block.attn_norm.weight.data_ptr()]
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                layers += projection(linear)
            layers += [block.mlp_norm.weight.data_ptr()]
            for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                layers += projection(linear)
        self.layers = torch.tensor(layers, dtype=torch.int64)
        self.head = torch.tensor([model.norm.weight.data_ptr(), *projection(model.lm_head)], dtype=torch.int64)
        self.embed = model.embed.weight.detach().float().contiguous()
        self.step = functools.partial(
            library().decode_step,
            self.layers.data_ptr(),
            self.head.data_ptr(),
            self.embed.data_ptr(),
            config.n_layers,
            config.d_model,
            config.n_heads,
            config.d_ff,
            config.vocab_size,
            config.norm_eps,
            model.rope_cos.data_ptr(),
            model.rope_sin.data_ptr(),
        )
        if cache.keys.dtype not in CACHE_DTYPES.values() or cache.keys.device.type != "cpu":
            raise ValueError(
                f"the decode kernel reads a CPU cache of {' or '.join(map(str, CACHE_DTYPES.values()))}, "
                f"not {cache.keys.dtype} on {cache.keys.device}"
            )
        self.cache_pointers = (
            cache.keys.data_ptr(),
            cache.values.data_ptr(),
            cache.keys.dtype == torch.float16,
            cache.keys.shape[1],
            cache.keys.shape[3],
        )

    def __call__(self, tokens, rows, positions):
        """Logits (B, vocab) of the next token of each sequence: `tokens` (B,) at `positions` (B,) of cache `rows`
        (B,), whose earlier positions the cache holds."""
        tokens, rows, positions = (
            torch.as_tensor(t, dtype=torch.int64).contiguous() for t in (tokens, rows, positions)
        )
        logits = torch.empty(len(tokens), self.vocab_size)
        self.step(
            tokens.data_ptr(),
            rows.data_ptr(),
            positions.data_ptr(),
            len(tokens),
            *self.cache_pointers,
            logits.data_ptr(),
            self.threads,
        )
        return logits


def rowwise_cache(config, rows, length, precision):
    """A KVCache for the decode kernel at `precision`: `rows` sequences of up to `length` tokens."""
    return KVCache(config, rows, length, dtype=CACHE_DTYPES[precision])


def rowwise_model(model, precision, threads=1):
    """A copy of `model` (on CPU, for inference) whose linear layers are RowwiseLinear at `precision` and whose
    norms are RowwiseRMSNorm."""
    model = copy.deepcopy(model).cpu().float().eval()
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.RMSNorm):
                setattr(module, name, RowwiseRMSNorm(child))
            elif isinstance(child, nn.Linear):
                if child.bias is not None:
                    raise ValueError(f"linear layer '{name}' has a bias, which RowwiseLinear does not take")
                setattr(module, name, RowwiseLinear(child.weight, precision, threads))
    return model
