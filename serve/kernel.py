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
  and an AVX2 integer multiply-add does twice the products of a float one (16 against 8), an AVX-512
  VNNI one eight times (64, on bytes as they are stored: the kernel uses it where the CPU has it).

The kernel is a set of PyTorch operators (torch.ops.rowwise.*: tensors in and out, checked at the
boundary), built once by `make setup` (`python -m serve.kernel`, torch.utils.cpp_extension) into the Python
environment; the server only loads it. A model's weights reach the decode step by the names the kernel
itself lists (block_weights), and a model with a parameter the kernel does not read is refused, so the
model (model/gpt.py) and its second definition in C++ cannot disagree unnoticed.
"""

import copy
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn

from model.errors import PipelineError
from model.gpt import KVCache

SOURCE = Path(__file__).with_name("kernel.cpp")
BUILD = Path(sys.prefix) / "serve-kernel"  # inside the environment whose torch it is built against
FLAGS = ("-O3", "-march=native", "-ffp-contract=off")
PRECISIONS = ("int8", "fp32")
# The KV cache's numbers at each precision. Decoding many long sequences reads the cache more than the
# weights (the ryangpt shape holds 7.4 MB of fp32 keys and values per sequence at position 480, against
# 15 MB of int8 weights shared by the whole batch), so int8 keeps them in 16-bit floats (relative error
# 2^-11, far inside int8's); fp32 rounds nothing.
CACHE_DTYPES = {"int8": torch.float16, "fp32": torch.float32}


class KernelBuildError(PipelineError):
    """The kernel is not built for this source, compiler flags, CPU and torch, or building it failed."""


def _cpu_flags():
    """The CPU's feature flags: a library built with -march=native is only valid on CPUs that have them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build_key():
    """What the built library must match: the source, the flags, the CPU and torch."""
    parts = [SOURCE.read_bytes(), " ".join(FLAGS).encode(), _cpu_flags().encode(), torch.__version__.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def library_file():
    return BUILD / f"rowwise_{build_key()}.so"


def build():
    """Compiles the kernel into BUILD (what `make setup` runs). Without a C++ compiler it says so in one line
    and returns: the pipeline needs none, and the server refuses to start until there is one."""
    from torch.utils import cpp_extension

    target = library_file()
    if target.is_file():
        return
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        print(
            f"no C++ compiler '{compiler}' found: the server's kernel is not built (install g++, then run "
            "`make setup` again); the pipeline itself needs none"
        )
        return
    name = target.stem
    folder = BUILD / "build"
    folder.mkdir(parents=True, exist_ok=True)
    # cpp_extension runs ninja (a requirement) by name; the environment's own is in its bin folder.
    os.environ["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        cpp_extension.load(
            name,
            [str(SOURCE)],
            extra_cflags=list(FLAGS),
            build_directory=str(folder),
            is_python_module=False,
        )
    except (RuntimeError, OSError) as error:
        raise KernelBuildError(f"building the server's kernel ({SOURCE}) failed: {error}") from None
    staged = target.with_name(target.name + ".tmp")
    shutil.copyfile(folder / f"{name}.so", staged)
    staged.rename(target)  # a server starting meanwhile never loads a half-written library
    for old in BUILD.glob("rowwise_*.so"):
        if old != target:
            old.unlink()


_loaded = False


def library():
    """Loads the built kernel (once); raises KernelBuildError, saying what to do, where it is not built."""
    global _loaded
    if not _loaded:
        if not library_file().is_file():
            if shutil.which(os.environ.get("CXX", "c++")) is None:
                raise KernelBuildError(
                    "the server's kernel is not built, and building it needs a C++ compiler: "
                    "install g++, then run `make setup`"
                )
            raise KernelBuildError(
                f"the server's kernel is not built for this {SOURCE.name}, CPU and torch: run `make setup`"
            )
        torch.ops.load_library(library_file())
        _loaded = True
    return torch.ops.rowwise


class RowwiseLinear(nn.Module):
    """A bias-free nn.Linear on CPU whose rows are computed independently (see the module docstring)."""

    def __init__(self, weight, precision, threads=1):
        super().__init__()
        self.threads = threads  # the kernel's, for each call
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        weight = weight.detach().float().contiguous()
        if precision == "int8":
            # Symmetric, one scale per output row: the largest weight of the row maps to 127.
            scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
            self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8))
            self.register_buffer("scale", scale.contiguous())
        else:
            self.register_buffer("weight", weight)
            self.scale = None
        library()  # fails here, at build time, where the kernel is not built

    def forward(self, x):
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        return library().linear(x, self.weight, self.scale, self.threads)


class RowwiseRMSNorm(nn.Module):
    """nn.RMSNorm in serve/kernel.cpp: torch's takes some 50 microseconds for one row of 320 on a small CPU,
    more than the linear layer after it, and decoding normalises 13 rows per token."""

    def __init__(self, norm):
        super().__init__()
        self.register_buffer("weight", norm.weight.detach().float().contiguous())
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        library()

    def forward(self, x):
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        return library().rms_norm(x, self.weight, self.eps)


# What of model/gpt.py's GPT the decode step reads besides its blocks (whose weights the kernel names), and the
# config fields it implements (n_layers and the sizes come from the tensors): a model with more is refused.
MODEL_WEIGHTS = {"embed.weight", "norm.weight", "lm_head.weight"}
CONFIG_FIELDS = {
    "vocab_size",
    "context_length",
    "n_layers",
    "d_model",
    "n_heads",
    "d_ff",
    "tie_embeddings",
    "rope_theta",
    "norm_eps",
}


def _check_architecture(model, block_weights):
    """Refuses a model that has what the decode step does not compute: the two would give different tokens."""
    unknown_config = set(type(model.config).model_fields) - CONFIG_FIELDS
    read = {f"layers.{i}.{name}.weight" for i in range(len(model.layers)) for name in block_weights} | MODEL_WEIGHTS
    read |= {name.removesuffix("weight") + "scale" for name in read}  # an int8 weight's scale
    unread = set(model.state_dict()) - read
    if unknown_config or unread:
        raise ValueError(
            f"serve/kernel.cpp's decode step does not implement {sorted(unknown_config | unread)} of model/gpt.py: "
            "extend its Decoder::step (and BLOCK_WEIGHTS), then run `make setup`"
        )


def decoder_arguments(model, cache, threads):
    """serve/kernel.cpp's Decoder's arguments, by name, for `model` (a rowwise_model) on `cache`: each block's
    weights in the order the kernel lists them (block_weights), with their int8 scales."""
    layers = [block.get_submodule(name) for block in model.layers for name in library().block_weights()]
    return dict(
        embed=model.embed.weight.detach().float().contiguous(),
        weights=[layer.weight for layer in layers],
        scales=[getattr(layer, "scale", None) for layer in layers],
        final_norm=model.norm.weight,
        head=model.lm_head.weight,
        head_scale=model.lm_head.scale,
        rope_cos=model.rope_cos,
        rope_sin=model.rope_sin,
        keys=cache.keys,
        values=cache.values,
        heads=model.config.n_heads,
        eps=model.config.norm_eps,
        threads=threads,
    )


class RowwiseDecoder:
    """The decode step of a rowwise_model, one new token per sequence, in one kernel call (serve/kernel.cpp's
    Decoder::step: the model's forward pass for one token with a cache, every row independent of the others).

    From Python the same step is some forty module calls and as many small tensors per token, which on a
    small model cost as much as the arithmetic. Prompts still go through the model itself (several tokens a
    step, per-sequence attention in KVCache), into the same `cache`. The decoder holds the tensors it reads
    (the model's weights when it was made, and the cache: serve/kernel.cpp's Decoder), so nothing it reads
    can be freed under it.
    """

    def __init__(self, model, cache, threads=1):
        _check_architecture(model, library().block_weights())
        self.cache = cache  # the kernel writes each step's keys and values into it
        self.decoder = torch.classes.rowwise.Decoder(*decoder_arguments(model, cache, threads).values())

    def __call__(self, tokens, rows, positions):
        """Logits (B, vocab) of the next token of each sequence: `tokens` (B,) at `positions` (B,) of cache `rows`
        (B,), whose earlier positions the cache holds."""
        return self.decoder.step(list(tokens), list(rows), list(positions))


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


if __name__ == "__main__":
    build()
