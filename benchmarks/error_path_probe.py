"""Why a C++ error of the CUDA op kills the process on the H200 image, decided in one run.

On that image (torch 2.11; the extension's .cpp and .cu host code compiled by /opt/gcc, linked
by the system g++) tests/test_cuda.py::test_errors_are_python_exceptions died with a segfault
when the CUDA op raised its head_dim error; the same throw raises RuntimeError elsewhere. Run
by benchmarks/run_gpu.sh after the build, this prints:

1. the toolchain: the compilers and the linker the build used (environment, PATH, Python's
   sysconfig, nvcc's host compiler, the build log's commands, the ``.comment`` of every object and
   of the .so), whether the .so has an ``.eh_frame_hdr`` search table, and which libstdc++,
   libgcc_s and libgomp copies a process maps once torch, CUDA and the extension are loaded;
2. error cases, each in its own process: the cpu op's error before and after CUDA is
   initialised, a C++ error of torch itself on CUDA tensors, the failing test's two calls and the
   test itself; a crashing call again with the newest C++ runtime found preloaded;
3. the backtrace of the first crash under cuda-gdb (the image has no gdb);
4. a tiny extension built three ways, throwing (TORCH_CHECK) from nvcc-compiled host code and
   from a .cpp: as setup.py builds (nvcc's default host compiler, ``$CXX``/c++, the setuptools
   linker), everything by the linker's compiler, everything by nvcc's host compiler. A crash in
   the first alone means the mix of compilers is the cause.

Exit status 0 when the failing test's calls raise RuntimeError.

    python benchmarks/error_path_probe.py [--build-log FILE] [--skip-gdb] [--skip-extensions]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP_CALL = "torch.ops.xmorpher_kernels.window_attention_forward({q}, {k}, {k}, [2, 2, 2], [2, 2, 2], 1.0, {bias}, None, None)"
CUDA_INIT = "torch.zeros(1, device='cuda')\n"

# name: (needs a GPU, setup code, the call that must raise, what the message must contain)
CASES: Dict[str, Tuple[bool, str, str, str]] = {
    "cpu op error, CUDA not initialised": (
        False, "q = torch.randn(1, 2, 2, 2, 1, 8); k = torch.randn(1, 2, 2, 2, 1, 9)\n", OP_CALL.format(q="q", k="k", bias="None"), ""),
    "cpu op error, after CUDA init": (
        True, CUDA_INIT + "q = torch.randn(1, 2, 2, 2, 1, 8); k = torch.randn(1, 2, 2, 2, 1, 9)\n", OP_CALL.format(q="q", k="k", bias="None"), ""),
    "torch's own C++ error on CUDA tensors": (True, "x = torch.empty(4, device='cuda')\n", "x.view(3)", "invalid"),
    "cuda op, head_dim 130 (the test's 1st call)": (
        True, "q = torch.randn(1, 2, 2, 2, 1, 130, device='cuda')\n", OP_CALL.format(q="q", k="q", bias="None"), "head_dim"),
    "cuda op, bias on the CPU (the test's 2nd call)": (
        True, "b = torch.zeros(1, 3, 3, 3); k = torch.randn(1, 2, 2, 2, 1, 16, device='cuda')\n", OP_CALL.format(q="k", k="k", bias="b"), "device"),
}
CASE_TEMPLATE = (
    "import torch, xmorpher_kernels\n{setup}"
    "try:\n"
    "    {call}\n"
    "    print('RESULT no error raised')\n"
    "except RuntimeError as error:\n"
    "    print('RESULT RuntimeError:', str(error).strip().splitlines()[0][:150])\n"
)


def run(command: Sequence[str], timeout: float, env: Optional[dict] = None, cwd: Optional[str] = None) -> Tuple[Optional[int], str]:
    """(return code or None on timeout, stdout + stderr)."""
    try:
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        return result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or b""
        return None, output.decode(errors="replace") if isinstance(output, bytes) else output
    except OSError as error:
        return 127, str(error)


def outcome(code: Optional[int], output: str, expected: str = "") -> str:
    results = [line[len("RESULT "):] for line in output.splitlines() if line.startswith("RESULT ")]
    if code is None:
        return "TIMED OUT"
    if code < 0:
        return f"CRASH (signal {-code}{', SIGSEGV' if code == -11 else ''})"
    if code != 0 or not results:
        return f"exit {code}: {(output.strip().splitlines() or [''])[-1][:150]}"
    if results[-1].startswith("RuntimeError") and expected and expected not in results[-1]:
        return f"raised, but not the expected error ({expected!r}): {results[-1]}"
    return f"ok, {results[-1]}"


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


# ------------------------------------------------------------------ 1. the toolchain


def first_line(command: Sequence[str]) -> str:
    code, output = run(command, 30)
    return (output.strip().splitlines() or ["?"])[0] if code == 0 else f"(failed: {output.strip()[:80]})"


def nvcc_host_compiler() -> Tuple[Optional[str], List[str]]:
    """The host compiler nvcc runs when none is named (from ``nvcc -dryrun``), and those lines."""
    with tempfile.TemporaryDirectory() as scratch:
        source = os.path.join(scratch, "empty.cu")
        with open(source, "w") as handle:
            handle.write("int main() { return 0; }\n")
        code, output = run(["nvcc", "-dryrun", "-c", source, "-o", os.path.join(scratch, "empty.o")], 60)
    lines = [line for line in output.splitlines() if line.startswith("#$ ") and re.search(r"\b(gcc|g\+\+|c\+\+|clang)\b", line)
             and not re.search(r"(cudafe|cicc|ptxas|fatbinary|nvlink)", line)]
    compiler = None
    if lines:
        token = shlex.split(lines[-1][3:])[0]
        compiler = shutil.which(token.strip('"')) or token
    return compiler, [line[:200] for line in lines[-2:]]


def build_log_commands(build_log: Optional[str]) -> Dict[str, List[str]]:
    """The first .cpp compile, the first nvcc compile and the link line of the build log."""
    found: Dict[str, List[str]] = {}
    if not build_log or not os.path.exists(build_log):
        return found
    with open(build_log, errors="replace") as handle:
        for line in handle:
            line = re.sub(r"^\[\d+/\d+\]\s*", "", line.strip())
            if not line or line.startswith(("In file", "/", "warning", "note")) and " -o " not in line:
                continue
            if " -shared " in f" {line} " and "-o " in line and ".so" in line:
                found.setdefault("link", shlex.split(line))
            elif re.search(r"\bnvcc\b", line.split(" ", 1)[0]) and " -c " in line:
                found.setdefault("nvcc", shlex.split(line))
            elif line.endswith((".o", ".o'")) or (" -c " in line and ".cpp" in line):
                found.setdefault("cxx", shlex.split(line))
    return found


def comments(path: str) -> str:
    code, output = run(["readelf", "-p", ".comment", path], 30)
    found = sorted({match.strip() for match in re.findall(r"\]\s+(.*)", output)})
    return "; ".join(found) if found else "(no .comment)"


def eh_frame_hdr_table(path: str) -> str:
    """Whether .eh_frame_hdr carries the binary-search table the unwinder uses (else it falls
    back to a linear search of .eh_frame), and how many FDEs it indexes."""
    code, output = run(["readelf", "-SW", path], 30)
    match = re.search(r"\]\s+\.eh_frame_hdr\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)", output)
    if not match:
        return "no .eh_frame_hdr section"
    offset = int(match.group(2), 16)
    with open(path, "rb") as handle:
        handle.seek(offset)
        header = handle.read(12)
    version, _, count_encoding, table_encoding = header[:4]
    if count_encoding == 0xFF or table_encoding == 0xFF:
        return f"version {version}, NO search table (fde_count/table encoding omitted)"
    count = int.from_bytes(header[8:12], "little") if count_encoding == 0x03 else f"? (encoding {count_encoding:#x})"
    return f"version {version}, search table with {count} FDEs"


def mapped_runtimes(with_cuda: bool) -> str:
    code = ("import torch\n" + (CUDA_INIT if with_cuda else "") + "import xmorpher_kernels\n"
            "paths = set()\n"
            "for line in open('/proc/self/maps'):\n"
            "    parts = line.split()\n"
            "    if len(parts) >= 6 and any(name in parts[5] for name in ('libstdc++', 'libgcc_s', 'libgomp', 'libunwind', '_C.', 'libc10.so')):\n"
            "        paths.add(parts[5])\n"
            "print('\\n'.join(sorted(paths)))\n")
    status, output = run([sys.executable, "-c", code], 120)
    return output.strip() if status == 0 else f"(failed: {output.strip()[-200:]})"


def toolchain(build_log: Optional[str], gpu: bool) -> Dict[str, object]:
    section("1. toolchain")
    facts: Dict[str, object] = {}
    for name in ("CC", "CXX", "LDSHARED", "CUDAHOSTCXX", "NVCC_CCBIN", "NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS",
                 "PATH", "LD_LIBRARY_PATH", "LD_PRELOAD"):
        print(f"{name}={os.environ.get(name, '')}")
    for tool in ("c++", "g++", "gcc", "x86_64-linux-gnu-g++", "x86_64-linux-gnu-gcc", "/opt/gcc/bin/g++", "nvcc"):
        path = shutil.which(tool)
        if path:
            version = first_line([path, "--version"]) if tool != "nvcc" else first_line([path, "--version"]) + " | " + \
                (run([path, "--version"], 30)[1].strip().splitlines() or [""])[-1]
            print(f"{tool}: {os.path.realpath(path)}: {version}")
    print("python sysconfig:", {key: sysconfig.get_config_var(key) for key in ("CC", "CXX", "LDSHARED", "LDCXXSHARED")})
    try:
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler

        compiler = new_compiler()
        customize_compiler(compiler)
        facts["setuptools_linker"] = getattr(compiler, "linker_so_cxx", None) or compiler.linker_so
        print(f"setuptools: compiler_cxx={getattr(compiler, 'compiler_cxx', None)} linker_so={compiler.linker_so} "
              f"linker_so_cxx={getattr(compiler, 'linker_so_cxx', None)}")
    except Exception as error:
        print(f"setuptools compiler: {error}")
    host, lines = nvcc_host_compiler()
    facts["nvcc_host"] = host
    print(f"nvcc's default host compiler: {host} ({first_line([host, '--version']) if host else '?'})")
    for line in lines:
        print(f"  {line}")
    try:
        import torch

        config = torch.__config__.show().splitlines()
        print("torch", torch.__version__, "|", next((line.strip() for line in config if "Compiler" in line or "GCC" in line), "?"),
              "| _GLIBCXX_USE_CXX11_ABI =", int(torch._C._GLIBCXX_USE_CXX11_ABI))
    except Exception as error:
        print(f"torch: {error}")
    commands = build_log_commands(build_log)
    facts["log"] = commands
    for kind in ("cxx", "nvcc", "link"):
        if kind in commands:
            print(f"build log, {kind}: {' '.join(commands[kind])[:300]}")
    if build_log and os.path.exists(build_log):
        with open(build_log, errors="replace") as handle:
            warnings = [line.strip() for line in handle if "eh_frame" in line or "unwind" in line.lower()]
        print(f"build log lines about .eh_frame/unwinding: {warnings[:5] or 'none'}")
    for path in sorted(glob.glob(os.path.join(ROOT, "build", "temp*", "**", "*.o"), recursive=True)):
        print(f".comment {os.path.relpath(path, ROOT)}: {comments(path)}")
    extensions = glob.glob(os.path.join(ROOT, "xmorpher_kernels", "_C*.so"))
    for path in extensions:
        print(f".comment {os.path.relpath(path, ROOT)}: {comments(path)}")
        print(f".eh_frame_hdr of {os.path.basename(path)}: {eh_frame_hdr_table(path)}")
        code, output = run(["readelf", "-d", path], 30)
        print("dynamic section:", "; ".join(re.sub(r"\s+", " ", line.strip()) for line in output.splitlines()
                                              if "NEEDED" in line or "RPATH" in line or "RUNPATH" in line))
    print("runtimes mapped after import torch, CUDA init, import xmorpher_kernels:" if gpu else
          "runtimes mapped after import torch, xmorpher_kernels:")
    print("  " + mapped_runtimes(gpu).replace("\n", "\n  "))
    return facts


# ------------------------------------------------------------------ 2. the error cases


def run_case(name: str, preload: str = "") -> str:
    _, setup, call, expected = CASES[name]
    env = dict(os.environ, LD_PRELOAD=preload) if preload else None
    code, output = run([sys.executable, "-X", "faulthandler", "-c", CASE_TEMPLATE.format(setup=setup, call=call)], 90, env=env)
    return outcome(code, output, expected)


def newest_runtime() -> str:
    """LD_PRELOAD value of the newest libstdc++ + libgcc_s found besides the system's, or ''."""
    for directory in ("/opt/gcc/lib64", "/opt/gcc/lib"):
        libraries = [os.path.join(directory, name) for name in ("libgcc_s.so.1", "libstdc++.so.6")]
        if all(os.path.exists(path) for path in libraries):
            return ":".join(libraries)
    return ""


def error_cases(gpu: bool) -> Dict[str, str]:
    section("2. error cases, each in its own process")
    names = [name for name, (needs_gpu, *_rest) in CASES.items() if gpu or not needs_gpu]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(names) + 1) as pool:
        futures = {name: pool.submit(run_case, name) for name in names}
        test = None
        if gpu:
            test = pool.submit(run, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                                     "tests/test_cuda.py::test_errors_are_python_exceptions"], 180, None, ROOT)
        results = {name: future.result() for name, future in futures.items()}
    for name, result in results.items():
        print(f"{name}: {result}")
    if test is not None:
        code, output = test.result()
        last = (output.strip().splitlines() or [""])[-1]
        results["the test itself"] = "passed" if code == 0 else f"{outcome(code, output) if code is None or code < 0 else 'failed'}: {last[:150]}"
        print(f"tests/test_cuda.py::test_errors_are_python_exceptions: {results['the test itself']}")
    preload = newest_runtime()
    crashed = [name for name, result in results.items() if result.startswith("CRASH") and name in CASES]
    if crashed and preload:
        results["preloaded"] = run_case(crashed[0], preload)
        print(f"{crashed[0]}, with LD_PRELOAD={preload}: {results['preloaded']}")
    elif crashed:
        print("no other C++ runtime found to preload (looked in /opt/gcc/lib64, /opt/gcc/lib)")
    return results


# ------------------------------------------------------------------ 3. the backtrace


def backtrace(name: str, timeout: float) -> None:
    section(f"3. backtrace of '{name}' under cuda-gdb")
    debugger = shutil.which("cuda-gdb") or shutil.which("gdb")
    if debugger is None:
        print("no cuda-gdb or gdb on PATH")
        return
    _, setup, call, _ = CASES[name]
    script = CASE_TEMPLATE.format(setup=setup, call=call)
    commands = ["set pagination off", "set confirm off", "set auto-solib-add off", "run",
                "sharedlibrary libgcc_s", "sharedlibrary libstdc", "sharedlibrary libc10.so", "sharedlibrary _C",
                "sharedlibrary libc.so", "bt 40", "x/4i $pc", "info sharedlibrary"]
    if "cuda-gdb" in debugger:
        commands.insert(2, "set cuda api_failures ignore")
    argv = [debugger, "-batch", "-nx"] + [part for command in commands for part in ("-ex", command)] + ["--args", sys.executable, "-c", script]
    code, output = run(argv, timeout)
    keep = [line for line in output.splitlines() if line.startswith(("#", "Thread", "Program", "=>", "From", "  0x"))
            or "signal" in line or "libstdc" in line or "libgcc" in line or "_C." in line or "libc10" in line]
    print("\n".join(keep[:120]) if keep else output[-3000:])
    print("-- last lines of the debugger's output:\n" + "\n".join(output.strip().splitlines()[-12:]))
    if code is None:
        print(f"(cuda-gdb did not finish within {timeout:.0f} s)")


# ------------------------------------------------------------------ 4. the tiny extension

CU_SOURCE = """#include <c10/util/Exception.h>
void xk_throw_from_cu(long n) { TORCH_CHECK(n < 0, "xk_probe: thrown from nvcc-compiled host code, n=", n); }
"""
CPP_SOURCE = """#include <ATen/core/Tensor.h>
#include <torch/library.h>
void xk_throw_from_cu(long n);
at::Tensor throw_from_cu(const at::Tensor& x) { xk_throw_from_cu(x.size(0)); return x; }
at::Tensor throw_from_cpp(const at::Tensor& x) {
  TORCH_CHECK(x.size(0) < 0, "xk_probe: thrown from the .cpp, size ", x.size(0));
  return x;
}
TORCH_LIBRARY(xk_probe, m) {
  m.def("throw_from_cu(Tensor x) -> Tensor", &throw_from_cu);
  m.def("throw_from_cpp(Tensor x) -> Tensor", &throw_from_cpp);
}
"""


def cxx_sibling(compiler: str) -> str:
    """The C++ driver of the same installation as ``compiler`` (gcc -> g++, cc -> c++)."""
    directory, name = os.path.split(compiler)
    for c_name, cxx_name in (("gcc", "g++"), ("cc", "c++"), ("clang", "clang++")):
        if name.endswith(c_name) and not name.endswith(cxx_name):
            candidate = os.path.join(directory, name[: -len(c_name)] + cxx_name)
            return candidate if directory else (shutil.which(candidate) or candidate)
    return compiler


def extension_variants(facts: Dict[str, object]) -> Dict[str, Dict[str, List[str]]]:
    """Three ways to build the tiny extension: (.cu host compiler flags, .cpp compiler, linker)."""
    log = facts.get("log") or {}
    link = log.get("link") or list(facts.get("setuptools_linker") or ["g++", "-shared"])
    objects = [i for i, token in enumerate(link) if token.endswith(".o")]
    link_prefix = link[: objects[0]] if objects else link
    link_flags = [t for t in (link[objects[-1] + 1:] if objects else []) if t.startswith(("-L", "-l", "-Wl", "-f"))]
    linker_cxx = cxx_sibling(shutil.which(link_prefix[0]) or link_prefix[0])
    cc = os.environ.get("CC")
    setup_nvcc = ["-ccbin", cc] if cc else []  # what torch's BuildExtension adds
    setup_cxx = os.environ.get("CXX", "c++")  # what torch's BuildExtension compiles .cpp files with
    host = str(facts.get("nvcc_host") or "g++")
    host_cxx = cxx_sibling(host)
    return {
        "as setup.py builds": {"nvcc": setup_nvcc, "cxx": [setup_cxx], "link": link_prefix, "link_flags": link_flags},
        "all by the linker's compiler": {"nvcc": ["-ccbin", linker_cxx], "cxx": [linker_cxx], "link": [linker_cxx, "-shared"],
                                         "link_flags": link_flags},
        "all by nvcc's host compiler": {"nvcc": ["-ccbin", host_cxx], "cxx": [host_cxx], "link": [host_cxx, "-shared"],
                                        "link_flags": link_flags},
    }


def build_variant(name: str, spec: Dict[str, List[str]], scratch: str) -> Tuple[str, Optional[str], str]:
    import torch
    import torch.utils.cpp_extension as cpp_extension

    folder = os.path.join(scratch, re.sub(r"\W+", "_", name))
    os.makedirs(folder, exist_ok=True)
    for file_name, text in (("throw.cu", CU_SOURCE), ("op.cpp", CPP_SOURCE)):
        with open(os.path.join(folder, file_name), "w") as handle:
            handle.write(text)
    with open(cpp_extension.__file__) as handle:
        standard = "c++20" if "c++20" in handle.read() else "c++17"
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    common = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{torch_include}",
              f"-I{os.path.join(torch_include, 'torch', 'csrc', 'api', 'include')}", f"-std={standard}", "-O2"]
    steps = [
        ["nvcc", *spec["nvcc"], "-c", "throw.cu", "-o", "throw.o", "--compiler-options", "-fPIC", *common],
        [*spec["cxx"], "-c", "op.cpp", "-o", "op.o", "-fPIC", *common],
        [*spec["link"], "op.o", "throw.o", f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{torch_lib}",
         *[f for f in spec["link_flags"] if not f.startswith("-l")], "-o", "probe.so"],
    ]
    for step in steps:
        code, output = run(step, 300, cwd=folder)
        if code != 0:
            return name, None, f"build step failed ({' '.join(step)[:160]}): {output.strip()[-300:]}"
    return name, os.path.join(folder, "probe.so"), f"{comments(os.path.join(folder, 'throw.o'))} | link: {' '.join(spec['link'][:1])}"


def build_tiny_extensions(facts: Dict[str, object], scratch: str) -> List[Tuple[str, Dict[str, List[str]], Optional[str], str]]:
    """Builds the three variants side by side: (name, spec, library or None, what was built)."""
    variants = extension_variants(facts)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(variants)) as pool:
        built = list(pool.map(lambda item: build_variant(item[0], item[1], scratch), variants.items()))
    return [(name, variants[name], library, detail) for name, library, detail in built]


def tiny_extensions(built, gpu: bool) -> Dict[str, str]:
    section("4. a tiny extension throwing from nvcc-compiled host code and from a .cpp, built three ways")
    results: Dict[str, str] = {}
    for name, spec, library, detail in built:
        print(f"{name}: nvcc {' '.join(spec['nvcc']) or '(its default host compiler)'}, .cpp by {spec['cxx'][0]}; {detail}")
        if library is None:
            results[name] = "not built"
            continue
        for where in ("cu", "cpp"):
            setup = "import torch\n" + (CUDA_INIT if gpu else "") + f"torch.ops.load_library({library!r})\n"
            script = CASE_TEMPLATE.replace("import torch, xmorpher_kernels\n", "").format(
                setup=setup, call=f"torch.ops.xk_probe.throw_from_{where}(torch.zeros(2))")
            code, output = run([sys.executable, "-X", "faulthandler", "-c", script], 90)
            results[f"{name}, throw from .{where}"] = outcome(code, output, "xk_probe")
            print(f"  throw from the .{where}{' (after CUDA init)' if gpu else ''}: {results[f'{name}, throw from .{where}']}")
    return results


def verdict(cases: Dict[str, str], extensions: Dict[str, str], gpu: bool) -> List[str]:
    crash = {name for name, result in {**cases, **extensions}.items() if result.startswith("CRASH")}
    lines = [] if gpu else ["no GPU here: the CUDA cases did not run"]
    test_calls = [name for name in cases if "the test's" in name]
    if test_calls and not any(name in crash for name in test_calls):
        lines.append("the CUDA op's errors reach Python here: no crash to explain")
    if "cpu op error, CUDA not initialised" in crash:
        lines.append("the cpu op's error crashes without CUDA: any C++ error of this extension crashes in this process")
    if "torch's own C++ error on CUDA tensors" in crash:
        lines.append("torch's own C++ errors crash too: the process's C++ runtime/unwinder is at fault, not this build")
    if "cpu op error, after CUDA init" in crash and "cpu op error, CUDA not initialised" not in crash:
        lines.append("the cpu op's error crashes only once CUDA is initialised: something CUDA loads breaks unwinding")
    as_built = [name for name in extensions if name.startswith("as setup.py builds") and name in crash]
    others = [name for name in extensions if not name.startswith("as setup.py builds") and name in crash]
    if as_built and not others:
        lines.append("the tiny extension crashes only when built as setup.py builds it: the mix of compilers is the cause; "
                     "compile the .cu host code and the .cpp with the compiler that links (see the report for the setup.py change)")
    if others:
        lines.append(f"the tiny extension also crashes when built by one compiler ({', '.join(others)}): not the mix alone")
    if cases.get("preloaded", "").startswith("ok"):
        lines.append("preloading the newer C++ runtime cures the crash: the runtime in use is older than the compiler of the code")
    if not crash and not lines:
        lines.append("nothing crashed")
    return lines or ["no single cause singled out: read the backtrace above"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-log", help="the log of `python setup.py build_ext` (its commands are replayed)")
    parser.add_argument("--skip-gdb", action="store_true")
    parser.add_argument("--skip-extensions", action="store_true")
    parser.add_argument("--gdb-timeout-s", type=float, default=150)
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    print(f"error path probe: torch {torch.__version__}, GPU: {torch.cuda.get_device_name() if gpu else 'none'}", flush=True)
    facts = toolchain(args.build_log, gpu)
    with tempfile.TemporaryDirectory() as scratch, concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        building = pool.submit(build_tiny_extensions, facts, scratch) if not args.skip_extensions else None
        cases = error_cases(gpu)
        crashed = [name for name, result in cases.items() if result.startswith("CRASH") and name in CASES]
        if crashed and not args.skip_gdb:
            backtrace(next((name for name in crashed if "head_dim" in name), crashed[0]), args.gdb_timeout_s)
        extensions = tiny_extensions(building.result(), gpu) if building else {}
    section("verdict")
    for line in verdict(cases, extensions, gpu):
        print(f"- {line}")
    failing = [name for name in cases if "the test's" in name and not cases[name].startswith("ok")]
    print(f"error path: {'FAILS: ' + ', '.join(failing) if failing else 'ok'}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
