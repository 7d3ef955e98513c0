"""vlmpipe: a reproducible, DVC-orchestrated pipeline that trains and evaluates
two vision-language models (an image captioner and a visual QA model).

Importing vlmpipe pins the CPU math kernels to the AVX2 instruction set, before torch is
loaded, unless the environment already chooses: PyTorch (``ATEN_CPU_CAPABILITY``), oneDNN
(``ONEDNN_MAX_CPU_ISA``) and MKL (``MKL_ENABLE_INSTRUCTIONS``, ``MKL_CBWR``) otherwise take
AVX-512 or AMX code paths wherever the CPU has them, and their other summation orders make the
same training run on one kind of CPU end with other weights than on another (measured on the
offline default: SigLIP image→text R@1 0.869 against 0.877, QA exact match 0.894 against
0.843). Pinned, a run on any x86-64 CPU with AVX2 and the same thread count reproduces the
committed models byte for byte. It costs speed where wider kernels exist (measured on an AVX-512
CPU: training steps 1.23x slower, ``benchmarks/bench_cpu_kernels.py``); export
``ATEN_CPU_CAPABILITY=avx512`` (and the others) to choose speed over that.
"""
import os

for _name, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"),
                      ("MKL_ENABLE_INSTRUCTIONS", "AVX2"), ("MKL_CBWR", "AVX2")):
    os.environ.setdefault(_name, _value)

__version__ = "0.1.0"
