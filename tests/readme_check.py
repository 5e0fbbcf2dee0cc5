"""Extract README.md's code and run its shell commands top to bottom, as a new user would.

``python tests/readme_check.py --demo DEMO_OUT --work DIR`` runs every ``moeclip`` command of
the README's bash blocks in one folder (``DIR``), in the README's order, after substituting what a
machine without pretrained weights or benchmarks cannot have: the demo's checkpoint for trained
checkpoints and ``runs/*``, the demo's synthetic data for benchmark folders, the tiny CLIP of the
demo for ``ViT-L``. Commands that need a cluster, a GPU, the network or a long training are listed
as skipped with the reason. A collision (a run refused because an earlier example wrote its
``--out``) fails the check. The fast parts (code extraction, the ``--out`` folders) are tests in
``tests/test_readme.py``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Tuple

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(lang: str, text: str | None = None) -> List[Tuple[str, str]]:
    """(section heading, block text) of every fenced block in ``lang``, in README order."""
    text = README.read_text() if text is None else text
    out, section = [], ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        if line.startswith("```"):  # any fenced block: its comments are no headings
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            if line.strip() == f"```{lang}":
                out.append((section, "\n".join(lines[i + 1:j])))
            i = j
        i += 1
    return out


def shell_commands(block: str) -> List[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    cmds, cur = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            cur += line[:-1].rstrip() + " "
            continue
        cur += line
        cmds.append(re.sub(r"\s+#.*$", "", cur).strip())  # trailing comment
        cur = ""
    return cmds


def out_folder(cmd: str) -> str | None:
    m = re.search(r"--out\s+(\S+)", cmd)
    return m.group(1).rstrip("/") if m else None


def readme_commands() -> List[Tuple[str, str]]:
    """(section, command) of every command of the README's bash blocks, in order."""
    return [(sec, c) for sec, block in code_blocks("bash") for c in shell_commands(block)]


def out_collisions(cmds: List[Tuple[str, str]]) -> Dict[str, List[str]]:
    """``--out`` folders used by more than one command that writes a new run there.

    A rerun of the same command with ``--resume`` (or ``reproduce``, which continues by design) is
    not a collision; neither is the same ``--out`` of commands that the README presents as
    alternatives for the same cluster (they never run on one machine).
    """
    seen: Dict[str, List[str]] = {}
    for _, cmd in cmds:
        folder = out_folder(cmd)
        if folder is None or "--resume" in cmd or "--dry-run" in cmd:
            continue
        if cmd.startswith("moeclip reproduce") and any(c == cmd for c in seen.get(folder, [])):
            continue  # "again: continues"
        seen.setdefault(folder, []).append(cmd)
    return {k: v for k, v in seen.items() if len(v) > 1}


# --------------------------------------------------------------------------- running the commands

#: (pattern, replacement) applied in order to each command: what this machine cannot have.
SUBSTITUTIONS: List[Tuple[str, str]] = [
    (r"runs/visa/checkpoint|/shared/runs/visa8/checkpoint", "demo_out/checkpoint"),        # a trained model
    (r"\bVisA=/data/\S+", "folder=demo_out/data/train"),                                    # benchmarks
    (r"\b(MVTec|BTAD)=/data/\S+", "folder=demo_out/data/heldout"),
    (r"folder=/data/line3-good", "folder=synth"),
    (r"folder=/data/line3", "folder=synth"),
    (r"\bimages/", "demo_out/data/heldout/nut/test/"),
    (r"refs/nut/", "synth/nut/train/good/"),
    (r'"refs/pill/\*\.png"', '"synth/nut/train/good/*.png"'),
    (r"s3://plant-images/line3/2026-12-01/", "demo_out/data/heldout/wood/test/"),
    (r"https://your-host/predict", "http://127.0.0.1:8000/predict"),
    (r"(?<![\w/])tests/golden/", str(README.parent / "tests" / "golden") + "/"),           # the repository's files
    (r"^PYTHONPATH=src python benchmarks/",
     f"PYTHONPATH={README.parent / 'src'} python {README.parent / 'benchmarks'}/"),
    (r"@part\.jpg", "@demo_out/data/heldout/nut/test/good/000.png"),
]

#: the tiny CLIP of the demo instead of ViT-L (trainings) and a short training
TRAIN_FLAGS = ("--clip-model demo_out/checkpoint/clip_config.json --clip-weights demo_out/checkpoint/clip.safetensors "
               "--image-size 64 --max-steps 2 --batch-size 4")

#: (pattern, reason): commands not run here
SKIPS: List[Tuple[str, str]] = [
    (r"^python3 -m venv|^pip ", "installation (this check runs in an installed environment)"),
    (r"^python -m pytest", "the test suite (run on its own)"),
    (r"^moeclip demo", "the demo (its output is given with --demo)"),
    (r"^torchrun", "needs several processes or nodes (tests/test_multinode.py runs the rendezvous)"),
    (r"moe_epoch_20\.pth|visa\.pth", "needs the official release's checkpoint"),
    (r"^moeclip reproduce(?!.*--dry-run)", "trains ViT-L on the benchmarks (days)"),
    (r"^moeclip reproduce", "needs the benchmarks under /data (missing ones are an error, by design)"),
    (r"--ray auto", "needs a Ray cluster (ray start --head)"),
    (r"^moeclip predict --transductive(?!.*--clip-weights)", "needs ViT-L-14-336 weights (open_clip downloads them)"),
    (r"^moeclip ablate", "trains once per setting (about 7 minutes; --full runs it)"),
]


def prepare(cmd: str, full: bool = False) -> Tuple[str | None, str]:
    """(command to run, or None; the reason when skipped)."""
    for pattern, reason in SKIPS:
        if re.search(pattern, cmd) and not (full and "ablate" in pattern):
            return None, reason
    for pattern, repl in SUBSTITUTIONS:
        cmd = re.sub(pattern, repl, cmd)
    if cmd.startswith("moeclip train"):
        cmd += " " + TRAIN_FLAGS
    if cmd.startswith("curl "):
        cmd = "curl --fail-with-body -sS " + cmd[len("curl "):]
    return cmd, ""


def _health(port: int = 8000) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _environment(cmd: str, work: Path, env: Dict[str, str]) -> Tuple[bool, str]:
    """``export NAME=...`` (evaluated by bash) or ``unset NAME``, applied to the commands that follow."""
    import subprocess

    if cmd.startswith("unset "):
        for name in cmd.split()[1:]:
            env.pop(name, None)
        return True, ""
    name = cmd.split()[1].split("=")[0]
    proc = subprocess.run(["bash", "-c", f'{cmd}; printf %s "${name}"'], cwd=work, env=env,
                          capture_output=True, text=True)
    env[name] = proc.stdout
    return proc.returncode == 0 and bool(proc.stdout), proc.stderr


def _prepare_work(demo: Path, work: Path) -> Dict[str, str]:
    """An empty ``work`` with ``demo_out`` -> ``demo`` and ``moeclip``/``python`` on PATH: the environment."""
    import os
    import sys

    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"{work}: not empty (the check starts from an empty folder)")
    (work / "demo_out").symlink_to(demo.resolve())
    shim = work / ".bin"
    shim.mkdir()
    # the README's `moeclip` and `python` are the installed environment's (a script: a symlink would
    # hide the virtual environment from the interpreter)
    for name, args in (("moeclip", " -m moeclip"), ("python", ""), ("python3", "")):
        (shim / name).write_text(f'#!/bin/sh\nexec "{sys.executable}"{args} "$@"\n')
        (shim / name).chmod(0o755)
    return {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"}


def run_all(demo: Path, work: Path, full: bool = False, say=print) -> Dict[str, List[str]]:
    """Run the README's commands top to bottom in ``work`` (``demo_out`` -> ``demo``)."""
    import os
    import subprocess
    import time

    env = _prepare_work(demo, work)
    report: Dict[str, List[str]] = {"ok": [], "failed": [], "collision": [], "skipped": []}
    server = None

    def stop_server():
        nonlocal server
        if server is not None:
            import signal

            os.killpg(server.pid, signal.SIGTERM)  # the shell and the service it started
            server.wait(timeout=90)
            server = None
            deadline = time.time() + 30
            while _health() and time.time() < deadline:
                time.sleep(0.2)

    def drain():
        nonlocal server
        if server is None:
            return "no service running"
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        code, server = server.wait(timeout=90), None
        return code

    try:
        for section, original in readme_commands():
            cmd, reason = prepare(original, full)
            if cmd is None:
                report["skipped"].append(f"{original}  [{reason}]")
                say(f"SKIP  {original[:100]}  ({reason})")
                continue
            started = time.time()
            if cmd.startswith("moeclip serve"):
                stop_server()
                if _health():
                    raise SystemExit("port 8000 is taken by another service: stop it first")
                server = subprocess.Popen("exec " + cmd.rstrip("& "), shell=True, cwd=work, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
                while not _health() and server.poll() is None and time.time() - started < 120:
                    time.sleep(0.5)
                ok = server.poll() is None and _health()
                err = "" if ok else server.stderr.read().decode(errors="replace")[-500:]
            elif cmd.startswith("kill -TERM <pid>"):  # the service drains and exits 0
                code = drain()
                ok, err = code == 0, f"the service exited with {code}"
            elif cmd.startswith(("export ", "unset ")):
                ok, err = _environment(cmd, work, env)
            else:
                proc = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True,
                                      timeout=1800)
                ok, err = proc.returncode == 0, proc.stderr.strip()
            seconds = time.time() - started
            if ok:
                report["ok"].append(original)
                say(f"OK    {original[:100]}  ({seconds:.1f} s)")
            else:
                last = err.strip().splitlines()[-1] if err.strip() else "(no message)"
                kind = "collision" if re.search(r"not empty|already exists", last) else "failed"
                report[kind].append(f"{original}\n      ran: {cmd}\n      -> {last}")
                say(f"{kind.upper():6}{original[:100]}\n      -> {last}")
    finally:
        stop_server()
    return report


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, type=Path, help="output folder of 'moeclip demo'")
    p.add_argument("--work", required=True, type=Path, help="an empty folder to run in")
    p.add_argument("--full", action="store_true", help="also run the ablation (minutes)")
    args = p.parse_args(argv)
    collisions = out_collisions(readme_commands())
    report = run_all(args.demo, args.work, args.full)
    print(f"\n{len(report['ok'])} ran, {len(report['skipped'])} skipped, {len(report['failed'])} failed, "
          f"{len(report['collision'])} refused because an earlier example used the folder; "
          f"--out folders shared by two examples: {len(collisions)}")
    for kind in ("failed", "collision"):
        for line in report[kind]:
            print(f"{kind}: {line}")
    return 1 if report["failed"] or report["collision"] or collisions else 0


if __name__ == "__main__":
    raise SystemExit(main())
