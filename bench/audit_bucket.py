"""audit of a bucket against an ordinary S3 listing and a download, side by side in one run.

Generates a tree of N checkpoints (bench/gen_tree.py), starts moto's S3 server on localhost
(fixtures/s3server.py, as the tests do), uploads the tree keeping its relative paths as keys,
and puts bench/latency_proxy.py in front of the server: every request waits ``--latency-ms``
before it is forwarded, as a round trip to real object storage would, and the proxy counts the
requests and the response bytes itself. Then, alternating, REPS times:

- the anchor, an ordinary client listing the same prefix: ``aws s3 ls --recursive --summarize``
  (awscli 1.46.3 in a venv of its own, ``bench/.venv-aws``, made here when missing so that the
  project's lock is untouched, or ``--aws PATH``), or boto3's ``list_objects_v2`` paginator when
  awscli cannot be installed (the JSON says why);
- ``ckpt-tools audit --json --min-age 0 --jobs J s3://bench/tree`` for each J of ``--jobs``;
- a download of every object under the prefix with J threads (boto3, bench/bucket_clients.py).

For each: whole-process wall time, requests and response bytes as the proxy counted them, the
same per checkpoint, and the ratio of each to the listing's. The audit's own report (``storage``
in its JSON) and the clients' own counts are checked against the proxy's; disagreements are
recorded, not hidden. Writes bench/out/audit_bucket.{json,md}.

    python bench/audit_bucket.py --checkpoints 1000 --latency-ms 20 --jobs 1 4 16 64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
from audit_vs_du import ckpt_tools_cmd  # noqa: E402
from gen_tree import generate  # noqa: E402
from latency_proxy import LatencyProxy  # noqa: E402

from fixtures.s3server import CLIENT_ENV, CREDENTIALS, moto_server, upload_tree  # noqa: E402

BUCKET = "bench"
AWS_VENV = HERE / ".venv-aws"
AWSCLI_PIN = "awscli==1.46.3"


def ensure_awscli(aws: Path | None) -> tuple[Path | None, str]:
    """awscli's ``aws``: the given one, or the bench venv's (made when missing); else None and
    why, and the anchor is boto3's paginator."""
    if aws is not None:
        return (aws, "") if aws.exists() else (None, f"{aws} does not exist")
    exe = AWS_VENV / "bin" / "aws"
    if not exe.exists():
        try:
            subprocess.run(["python3.11", "-m", "venv", str(AWS_VENV)], check=True)
            subprocess.run([str(AWS_VENV / "bin" / "python"), "-m", "pip", "install", "-q",
                            AWSCLI_PIN], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            return None, f"awscli could not be installed in {AWS_VENV}: {exc}"
    return exe, ""


def client_env() -> dict:
    """This environment without any AWS setting or proxy of its own, plus the server's dummy
    credentials: every client reaches the local proxy and nothing else."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k.lower() not in ("http_proxy", "https_proxy")}
    return env | CLIENT_ENV | {"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE":
                               os.devnull, "NO_PROXY": "127.0.0.1", "HF_HUB_OFFLINE": "1"}


def commands(url: str, proxy: str, jobs: list[int], aws: Path | None, download_to: Path) -> dict:
    """name → argv of every timed command."""
    if aws is not None:
        anchor = [str(aws), "s3", "ls", url + "/", "--recursive", "--summarize",
                  "--endpoint-url", proxy]
    else:
        anchor = [sys.executable, str(HERE / "bucket_clients.py"), "list", "--endpoint", proxy, url]
    options = [a for k, v in ({"endpoint_url": proxy} | CREDENTIALS).items()
               for a in ("--storage-option", f"{k}={v}")]
    cmds = {"listing": anchor}
    for j in jobs:
        cmds[f"audit -j {j}"] = ckpt_tools_cmd() + ["audit", "--json", "--no-progress", "--min-age",
                                                    "0", "--jobs", str(j), url, *options]
    for j in jobs:
        cmds[f"download -j {j}"] = [sys.executable, str(HERE / "bucket_clients.py"), "download",
                                    "--endpoint", proxy, "--jobs", str(j), url, str(download_to)]
    return cmds


def cpu_seconds(server_pid: int) -> dict:
    """CPU time (user + system) so far of the clients run (finished children), of this process
    (the proxy's threads: the main thread only waits) and of the server."""
    kids, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    try:
        fields = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        server = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        server = float("nan")
    return {"client": kids.ru_utime + kids.ru_stime, "proxy": me.ru_utime + me.ru_stime,
            "server": server}


def run_once(argv: list[str], env: dict, proxy: LatencyProxy,
             server_pid: int = 0) -> tuple[float, dict, str]:
    """Wall time, what the proxy forwarded meanwhile (and the CPU time each party spent), and
    stdout of one command."""
    proxy.traffic.take()
    cpu0 = cpu_seconds(server_pid)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    cpu1 = cpu_seconds(server_pid)
    traffic = proxy.traffic.take() | {"cpu_s": {k: cpu1[k] - cpu0[k] for k in cpu0}}
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv[:6])}... failed ({proc.returncode}): "
                         f"{proc.stderr.decode()[-800:]}")
    return elapsed, traffic, proc.stdout.decode()


def self_report(name: str, stdout: str) -> dict:
    """What the command says it did: the audit's ``storage`` counts and checkpoint count, awscli's
    summary, or the boto3 client's JSON line."""
    if name.startswith("audit"):
        doc = json.loads(stdout)
        return {"checkpoints": len(doc["checkpoints"]), **doc["storage"]}
    if "Total Objects:" in stdout:
        objects = re.search(r"Total Objects: (\d+)", stdout)
        size = re.search(r"Total Size: (\d+)", stdout)
        return {"objects": int(objects.group(1)), "bytes": int(size.group(1))}
    return json.loads(stdout.strip().splitlines()[-1])


def disagreements(name: str, mine: dict, seen: dict, uploaded: dict) -> list[str]:
    """Where the command's own account differs from the proxy's (or from what was uploaded)."""
    out = []
    lists = seen["by_kind"].get("list", 0)
    reads = seen["requests"] - lists
    if name.startswith("audit"):
        if mine["requests"] != seen["requests"]:
            out.append(f"requests: audit says {mine['requests']} ({mine['listings']} listing, "
                       f"{mine['reads']} reads), proxy forwarded {seen['requests']} "
                       f"({lists} listing pages, {reads} other)")
        if mine["reads"] != reads:
            out.append(f"reads: audit says {mine['reads']}, proxy forwarded {reads} non-listing")
        read_bytes = seen["response_bytes"] - seen["bytes_by_kind"].get("list", 0)
        if mine["bytes_read"] != read_bytes:
            out.append(f"bytes: audit says {mine['bytes_read']} read, proxy forwarded "
                       f"{read_bytes} outside listings")
    elif mine.get("objects") != uploaded["objects"] or mine.get("bytes") != uploaded["bytes"]:
        out.append(f"saw {mine.get('objects')} objects, {mine.get('bytes')} bytes; uploaded "
                   f"{uploaded['objects']}, {uploaded['bytes']}")
    if name.startswith("download") and seen["by_kind"].get("get", 0) != uploaded["objects"]:
        out.append(f"proxy forwarded {seen['by_kind'].get('get', 0)} GETs for "
                   f"{uploaded['objects']} objects")
    return out


def measure(cmds: dict, env: dict, proxy: LatencyProxy, reps: int, download_to: Path,
            uploaded: dict, server_pid: int) -> dict:
    """Every command REPS times, alternating forward and backward; per command its times, the
    proxy's counts of the last run and the disagreements of any run."""
    results = {name: {"seconds": [], "disagreements": []} for name in cmds}
    names = list(cmds)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            t, seen, stdout = run_once(cmds[name], env, proxy, server_pid)
            shutil.rmtree(download_to, ignore_errors=True)
            mine = self_report(name, stdout)
            r = results[name]
            r["seconds"].append(t)
            r |= {"proxy": seen, "self_reported": mine}
            r["disagreements"] += [f"rep {rep}: {d}"
                                   for d in disagreements(name, mine, seen, uploaded)]
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in seen["cpu_s"].items())
            print(f"rep {rep} {name}: {t:.2f} s, {seen['requests']:,} requests, "
                  f"{seen['response_bytes']:,} bytes; CPU s: {cpu}", file=sys.stderr, flush=True)
    return results


def rows(results: dict, checkpoints: int) -> list[dict]:
    anchor = results["listing"]
    a_s = statistics.median(anchor["seconds"])
    a_req, a_bytes = anchor["proxy"]["requests"], anchor["proxy"]["response_bytes"]
    out = []
    for name, r in results.items():
        s = statistics.median(r["seconds"])
        req, nbytes = r["proxy"]["requests"], r["proxy"]["response_bytes"]
        out.append({"command": name, "seconds": r["seconds"], "median_s": s,
                    "s_per_checkpoint": s / checkpoints, "requests": req,
                    "requests_by_kind": r["proxy"]["by_kind"], "cpu_s": r["proxy"]["cpu_s"],
                    "bytes_by_kind": r["proxy"]["bytes_by_kind"],
                    "requests_per_checkpoint": req / checkpoints, "bytes": nbytes,
                    "bytes_per_checkpoint": nbytes / checkpoints,
                    "ratio_s": s / a_s, "ratio_requests": req / a_req,
                    "ratio_bytes": nbytes / a_bytes, "self_reported": r["self_reported"],
                    "disagreements": r["disagreements"]})
    return out


def markdown(doc: dict) -> str:
    lines = [f"# audit of a bucket ({doc['checkpoints']:,} checkpoints, {doc['objects']:,} objects, "
             f"{doc['bytes']:,} bytes)", "",
             f"moto on localhost behind a proxy adding {doc['latency_ms']} ms per request; "
             f"anchor: {doc['anchor']}; {doc['reps']} run(s) each, alternating; "
             f"{doc['machine']['cpus']} CPUs.", "",
             "| command | wall, median | s / checkpoint | requests (per ckpt) | bytes (per ckpt) "
             "| ratio to listing: s / requests / bytes | CPU s: client / proxy / server |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        lines.append(f"| `{r['command']}` | {r['median_s']:.2f} s | {r['s_per_checkpoint'] * 1e3:.2f} ms "
                     f"| {r['requests']:,} ({r['requests_per_checkpoint']:.2f}) "
                     f"| {r['bytes']:,} ({r['bytes_per_checkpoint'] / 1e3:.1f} kB) "
                     f"| {r['ratio_s']:.2f}× / {r['ratio_requests']:.1f}× / {r['ratio_bytes']:.1f}× "
                     f"| {' / '.join(f'{v:.1f}' for v in r['cpu_s'].values())} |")
    lines += ["", "Disagreements between a command's own account and the proxy's:", ""]
    lines += [f"- `{r['command']}`: {d}" for r in doc["rows"] for d in r["disagreements"][:1]] or ["- none"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=1000)
    ap.add_argument("--latency-ms", type=float, default=20, help="injected delay per request")
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--base-side", type=int, default=128,
                    help="side of the merged files' base weights (gen_tree's 2048 is 128 MiB a file)")
    ap.add_argument("--aws", type=Path, default=None,
                    help="awscli's `aws` (default: bench/.venv-aws, made when missing)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    aws, why_not_aws = ensure_awscli(args.aws)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-bucket-", dir=args.workdir))
    try:
        tree = work / "tree"
        info = generate(tree, args.checkpoints, base_side=args.base_side)
        with moto_server(work / "moto.log") as server:
            fs = server.filesystem()
            fs.mkdir(BUCKET)
            t0 = time.perf_counter()
            left_out = upload_tree(fs, tree, f"{BUCKET}/tree")
            print(f"uploaded in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            found = fs.find(f"{BUCKET}/tree", detail=True)
            uploaded = {"objects": len(found), "bytes": sum(i["size"] for i in found.values())}
            shutil.rmtree(tree)
            proxy = LatencyProxy(server.endpoint, args.latency_ms / 1000).start()
            try:
                download_to = work / "download"
                cmds = commands(f"s3://{BUCKET}/tree", proxy.endpoint, args.jobs, aws, download_to)
                env = client_env()
                run_once(cmds["listing"], env, proxy)   # untimed: the server's first answers
                results = measure(cmds, env, proxy, args.reps, download_to, uploaded, server.pid)
            finally:
                proxy.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
           "command": " ".join([sys.executable] + (argv if argv is not None else sys.argv)),
           "checkpoints": args.checkpoints, "files": info["files"], **uploaded,
           "left_out_of_upload": left_out, "latency_ms": args.latency_ms, "reps": args.reps,
           "merged_base_side": args.base_side,
           "anchor": "aws s3 ls --recursive --summarize" if aws else "boto3 list_objects_v2",
           "why_not_awscli": why_not_aws,
           "rows": rows(results, args.checkpoints)}
    (args.out / "audit_bucket.json").write_text(json.dumps(doc, indent=2))
    md = markdown(doc)
    (args.out / "audit_bucket.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
