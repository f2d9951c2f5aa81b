"""The GPU proof (issue 21): run on a GPU machine that reaches no package registry; prints ONE JSON object.

Two commands (``benchmarks/gpu_check.sh`` calls this file with the GPU machine's own ``python3``):

``prepare`` (here, with a registry) builds the wheel set the GPU machine's Python lacks:
    bash benchmarks/gpu_check.sh --prepare --python-version 3.12 --wheels .whl [--have have.txt]
It walks loraflock's requirements through this environment's installed distributions (their
versions pinned as installed here) and downloads each one's wheel, ``--no-deps``, for
``--python-version`` on manylinux x86_64, into ``--wheels`` with a ``plan.json``. Never the
torch stack (torch, triton, nvidia-*): CUDA wheels are gigabytes; the GPU machine's own CUDA
torch is used. ``--have FILE`` (names, one a line, e.g. that machine's ``pip list``) leaves
out what it already has, ``--exclude ray`` leaves Ray out (its wheel is ~76 MB; the run then skips
the job and says so); ``--dry-run`` writes the plan only.

``run`` (there) checks CUDA first and stops with a clear message and exit 3 without it; then
installs from the wheel set only what is missing there (``pip --no-index --no-deps --target``),
checks every module loraflock imports, and runs, each under a time limit (8 minutes in all):
``tests/gpu`` (CUDA paths against CPU references), a tiny job with ``ray.use_gpu: true`` end to
end, and ``benchmarks/multitask_throughput.py`` on a SmolLM2-shaped random model at seq 512
(flock vs the same 8 tasks trained one after another with PEFT). Progress goes to stderr and
the logs to ``--out``; stdout is one JSON object. Its stdlib-only top level runs before any
dependency is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Never carried: the GPU machine's own CUDA build of these is what must run.
TORCH_STACK = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
# Modules the product and the check import; a missing one stops the run with its name. Ray's are
# checked apart: without them (its wheel is ~76 MB, more than some transports carry) the run still
# does tests/gpu (the Ray-free ones) and the throughput benchmark, skips the job and says so.
MODULES = ["pyro", "pydantic", "datasets", "transformers", "peft", "safetensors", "gguf", "yaml", "scipy",
           "pyarrow", "matplotlib", "pytest"]
RAY_MODULES = ["ray", "ray.train", "ray.tune"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
EXTRAS = {"ray": {"train", "tune"}}  # ray[default] (dashboard) is not needed to run a job or the tests
EXIT_NO_CUDA, EXIT_SETUP, EXIT_FAILED = 3, 4, 5


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def say(msg: str) -> None:
    sys.stderr.write(f"[gpu_check] {msg}\n")
    sys.stderr.flush()


# ------------------------------------------------------------------------------------- prepare
def _root_requirements() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] + ["pytest"]


def closure(roots: list[str], python_version: str) -> tuple[dict[str, str], list[str]]:
    """{distribution: installed version} of ``roots`` and their requirements (markers evaluated for
    ``python_version`` on Linux), walked through this environment; and the names not installed here."""
    from packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    found: dict[str, str] = {}
    absent: list[str] = []
    todo = [(Requirement(r), None) for r in roots]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra or ""}):
            continue
        name = _norm(req.name)
        extras = frozenset(EXTRAS[name]) if name in EXTRAS else frozenset(req.extras)
        if (name, extras) in seen or TORCH_STACK.match(name):
            continue
        seen.add((name, extras))
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            absent.append(name)
            continue
        found[name] = dist.version
        for r in dist.requires or []:
            sub = Requirement(r)
            for e in [None, *extras]:
                if sub.marker is None or sub.marker.evaluate({**env, "extra": e or ""}):
                    todo.append((sub, e))
                    break
    return dict(sorted(found.items())), sorted(set(absent))


def pip_download_cmd(pins: list[str], python_version: str, dest: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    return cmd + pins


def _pure_wheel(name: str, version: str, dest: Path) -> tuple[list[str], str | None]:
    """Build ``name==version`` from its sdist into ``dest`` if the result runs on any Python (``py3-none-any``)."""
    before = set(os.listdir(dest))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), f"{name}=={version}"],
                       capture_output=True, text=True)
    new = sorted(set(os.listdir(dest)) - before)
    if r.returncode != 0 or not new:
        return [], f"no wheel and no build: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    if not new[0].endswith("-none-any.whl"):
        for f in new:
            (dest / f).unlink()
        return [], f"no wheel for Python {name}, and its build here is not pure Python ({new[0]})"
    return new, None


def prepare(args) -> int:
    if not re.fullmatch(r"3\.\d{1,2}", args.python_version):
        say(f"--python-version {args.python_version!r}: give major.minor, e.g. 3.12 (the GPU machine's python3)")
        return EXIT_SETUP
    dest = Path(args.wheels)
    dest.mkdir(parents=True, exist_ok=True)
    roots = args.packages.split(",") if args.packages else _root_requirements()
    pins, absent = closure(roots, args.python_version)
    have = set()
    if args.have:
        have = {_norm(re.split(r"[=\s<>]", line.strip(), maxsplit=1)[0])
                for line in Path(args.have).read_text().splitlines() if line.strip() and not line.startswith("#")}
    excluded = {_norm(n) for n in (args.exclude or "").split(",") if n}
    pins = {n: v for n, v in pins.items() if n not in have and n not in excluded}
    plan = {"python_version": args.python_version, "packages": pins, "not_installed_here": absent,
            "left_out_as_present": sorted(have), "wheels": {}, "failed": {}}
    if not args.dry_run:
        for name, version in pins.items():  # one by one: a package without a wheel is named, not fatal
            before = set(os.listdir(dest))
            r = subprocess.run(pip_download_cmd([f"{name}=={version}"], args.python_version, dest),
                               capture_output=True, text=True)
            new = sorted(set(os.listdir(dest)) - before) or [f for f in os.listdir(dest)
                                                               if _norm(f.split("-")[0]) == name]
            if r.returncode != 0 or not new:  # an sdist only: build it here if it is pure Python
                new, why = _pure_wheel(name, version, dest)
                if not new:
                    plan["failed"][name] = why or (r.stderr.strip().splitlines() or ["no wheel"])[-1]
                    continue
            plan["wheels"][name] = new[0]
        plan["bytes"] = sum((dest / f).stat().st_size for f in plan["wheels"].values())
    (dest / "plan.json").write_text(json.dumps(plan, indent=1))
    say(f"plan: {len(pins)} distributions for Python {args.python_version} -> {dest / 'plan.json'}"
        + ("" if args.dry_run else f"; {len(plan['wheels'])} wheels, {plan['bytes'] / 2**20:.1f} MiB"))
    if plan["failed"]:
        say(f"no wheel for {sorted(plan['failed'])}: the GPU machine must already have them")
    print(json.dumps({"prepared": str(dest), "python_version": args.python_version, "packages": len(pins),
                      "wheels": len(plan["wheels"]), "failed": plan["failed"], "bytes": plan.get("bytes")}))
    return 0


# ------------------------------------------------------------------------------------- run
def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def cuda_status() -> tuple[bool, str, dict]:
    """(usable, why not, facts) of this Python's torch and CUDA, without importing anything else."""
    try:
        import torch
    except ImportError:
        return False, ("torch is not installed for this python3 (the wheel set never carries it: CUDA builds are "
                       "gigabytes); use the GPU machine's own CUDA torch, the build deploy/Dockerfile pins"), {}
    facts = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if not torch.cuda.is_available():
        return False, (f"no CUDA: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no usable GPU here; "
                       "run this on a GPU machine (a CPU build of torch or a driver older than its CUDA also "
                       "gives this)"), facts
    facts.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                 gpus=torch.cuda.device_count())
    return True, "", facts


def check_plan(plan: dict, version: str) -> str | None:
    """Why the wheel set cannot serve this Python, or None."""
    if plan.get("python_version") != version:
        return (f"the wheel set was built for Python {plan.get('python_version')}, this python3 is {version}: "
                f"rebuild it with `bash benchmarks/gpu_check.sh --prepare --python-version {version} --wheels DIR`")
    return None


def missing_distributions(plan: dict) -> list[str]:
    out = []
    for name in plan.get("wheels", {}):
        try:
            md.version(name)
        except md.PackageNotFoundError:
            out.append(name)
    return out


def _missing_modules(modules: list[str], env: dict) -> list[str]:
    """Which of ``modules`` the python3 cannot import with ``env`` (in a child: nothing loads here)."""
    probe = subprocess.run([sys.executable, "-c", "import importlib,sys\nfor m in sys.argv[1:]:\n"
                            "    try: importlib.import_module(m)\n    except Exception as e: print(m)",
                            *modules], env=env, capture_output=True, text=True)
    return probe.stdout.split()


def _run(cmd: list[str], log: Path, timeout: float, env: dict) -> tuple[int, float, str]:
    """Run ``cmd``, its output into ``log``; (exit code or 124 on time-out, seconds, last 2000 chars)."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, round(time.perf_counter() - t0, 1), log.read_text()[-2000:]


def _pytest_counts(text: str) -> dict:
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", text)}


def job_spec(out: Path) -> Path:
    """examples/tiny.yaml (every stage: flock, baselines, PESC, recycle, search) with one GPU worker."""
    text = (ROOT / "examples" / "tiny.yaml").read_text()
    if re.search(r"^ray:", text, re.M):
        raise SystemExit("examples/tiny.yaml gained a ray: section: merge use_gpu into it here")
    path = out / "tiny-gpu.yaml"
    path.write_text(text.rstrip("\n") + "\nray:\n  use_gpu: true\n  num_workers: 1\n")
    return path


def bench_report(text: str) -> dict | None:
    """The benchmark's JSON object, the last one in its log (stderr lines come before it)."""
    start = text.rfind('{\n "benchmark"')
    if start < 0:
        return None
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0]
    except ValueError:
        return None


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"check": "gpu_check", "python": python_version(), "ok": False}

    def finish(code: int, **extra) -> int:
        result.update(extra)
        print(json.dumps(result))
        return code

    usable, why, facts = cuda_status()
    result.update(facts)
    if not usable:
        say(why)
        return finish(EXIT_NO_CUDA, stage="cuda", error=why)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "RAY_TRAIN_V2_ENABLED": "1"}
    plan_file = Path(args.wheels) / "plan.json"
    installed: list[str] = []
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        bad = check_plan(plan, python_version())
        if bad:
            say(bad)
            return finish(EXIT_SETUP, stage="wheels", error=bad)
        installed = missing_distributions(plan)
        if installed:
            site = Path(args.site)
            wheels = [str(Path(args.wheels) / plan["wheels"][n]) for n in installed]
            say(f"installing {len(wheels)} missing distributions into {site}: {installed}")
            r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                "--upgrade", "--target", str(site), *wheels], capture_output=True, text=True)
            if r.returncode != 0:
                msg = f"pip could not install the wheel set: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
                say(msg)
                return finish(EXIT_SETUP, stage="install", error=msg)
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{args.site}"
    else:
        say(f"no wheel set at {plan_file}: using what this python3 has")
    result["installed"] = installed
    missing = _missing_modules(MODULES, env)
    if missing:
        msg = (f"missing modules: {missing}; add their distributions to the wheel set "
               "(`bash benchmarks/gpu_check.sh --prepare --python-version "
               f"{python_version()} --wheels DIR`) and carry it here")
        say(msg)
        return finish(EXIT_SETUP, stage="modules", error=msg)
    no_ray = _missing_modules(RAY_MODULES, env)
    if no_ray:
        say(f"no Ray here ({no_ray}): the tiny job is skipped, so the check cannot pass; the rest runs")
    py = sys.executable
    stages = {}
    say("tests/gpu ...")
    rc, secs, tail = _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"], out / "tests_gpu.log",
                          args.test_timeout, env)
    stages["tests_gpu"] = {"rc": rc, "seconds": secs, **_pytest_counts(tail)}
    if no_ray:
        stages["job"] = {"rc": None, "skipped": f"Ray is not installed here: {no_ray}"}
    else:
        say(f"tests/gpu: rc {rc} in {secs}s; tiny job with ray.use_gpu ...")
        spec = job_spec(out)
        rc, secs, tail = _run([py, "-c", "import sys; from orchestrator.cli import main; sys.exit(main())", "run",
                               str(spec), "--out", str(out / "job")], out / "job.log", args.job_timeout, env)
        stages["job"] = {"rc": rc, "seconds": secs, "report": (out / "job" / "report.json").is_file()}
    say(f"job: rc {rc} in {secs}s; throughput benchmark ...")
    rc, secs, tail = _run([py, "benchmarks/multitask_throughput.py", "--model", "smollm2-shaped", "--device", "cuda",
                           "--tasks", "8", "--batch", "8", "--seq", "512", "--seqs-per-task", "32", "--epochs", "2",
                           "--warmup", "2", "--arms", "flock,flock_noprefix,peft_sequential"],
                          out / "throughput.log", args.bench_timeout, env)
    bench = {"rc": rc, "seconds": secs}
    report = bench_report((out / "throughput.log").read_text()) if rc == 0 else None
    if report:
        arms = report["arms"]
        bench.update({arm: {k: arms[arm].get(k) for k in ("train_tokens_per_s", "tokens_per_s", "mfu_model", "hfu",
                                                           "step_s_median")} for arm in arms})
        bench.update({k: report.get(k) for k in ("ratio_vs_peft_sequential", "train_only_ratio_vs_peft_sequential",
                                                  "peak", "mfu_note")})
        bench["targets"] = {
            "mfu_model_flock_ge_0.40": (arms["flock"].get("mfu_model") or 0) >= 0.40,
            "flock_ge_3x_peft_sequential": (report.get("ratio_vs_peft_sequential") or 0) >= 3.0,
        }
    stages["throughput"] = bench
    ok = stages["tests_gpu"]["rc"] == 0 and stages["job"]["rc"] == 0 and bench["rc"] == 0
    result["ok"] = ok
    return finish(0 if ok else EXIT_FAILED, stages=stages, logs=str(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build the wheel set (needs a package registry)")
    p.add_argument("--python-version", required=True, help="the GPU machine's python3 major.minor, e.g. 3.12")
    p.add_argument("--wheels", default=".whl")
    p.add_argument("--have", help="file of distribution names the GPU machine already has (one a line)")
    p.add_argument("--packages", help="comma-separated requirements instead of loraflock's own")
    p.add_argument("--exclude", help="comma-separated distributions to leave out (e.g. ray: its wheel is ~76 MB; "
                                     "the run then skips the job stage)")
    p.add_argument("--dry-run", action="store_true", help="write plan.json only")
    r = sub.add_parser("run", help="the GPU check (needs CUDA)")
    r.add_argument("--wheels", default=".whl")
    r.add_argument("--site", default="/tmp/loraflock-site", help="where missing wheels are installed")
    r.add_argument("--out", default="/tmp/loraflock-gpu-check")
    r.add_argument("--test-timeout", type=float, default=150)
    r.add_argument("--job-timeout", type=float, default=180)
    r.add_argument("--bench-timeout", type=float, default=150)
    args = ap.parse_args(argv)
    return prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
