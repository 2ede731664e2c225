"""`llama-artifacts`: publish prebuilt artifacts to a store, list a store, pull the build that fits
this machine, and verify an artifact on disk.

    llama-artifacts publish DIR STORE [--name NAME]
    llama-artifacts list REF [--tp N]
    llama-artifacts pull REF [-o DIR] [--tp N] [--connections N]
    llama-artifacts verify DIR

REF is a store (a directory, an http(s) URL, or hf://ORG/REPO[@REVISION]), optionally followed by
:NAME or @sha256:DIGEST (artifacts/store_ref.py). Refusals are one line and exit status 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

from llama_aot.artifacts.errors import ArtifactError, CLIParser, ConfigError

PROG = "llama-artifacts"


class _Parser(CLIParser):
    """Subcommand usage errors also begin `llama-artifacts: error:`."""

    def error(self, message):
        self.prog = PROG
        super().error(message)


def parse_args(argv):
    p = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{publish,list,pull,verify}")
    pub = sub.add_parser("publish", help="publish an artifact directory into a store")
    pub.add_argument("artifact", type=Path, help="artifact directory built by llama-compile")
    pub.add_argument("store", help="a directory, or hf://ORG/REPO[@BRANCH]")
    pub.add_argument("--name", help="the name to publish it under (default: the directory's name)")
    ls = sub.add_parser("list", help="list a store's artifacts and which ones this machine runs")
    ls.add_argument("ref")
    ls.add_argument("--tp", type=int, help="the number of ranks to run (default: one per GPU; 1 on CPU)")
    pl = sub.add_parser("pull", help="pull the artifact that fits this machine (or REF:NAME, REF@sha256:DIGEST)")
    pl.add_argument("ref")
    pl.add_argument("-o", "--output", type=Path, help="where to put it (default: artifacts/NAME)")
    pl.add_argument("--tp", type=int, help="the number of ranks to run (default: one per GPU; 1 on CPU)")
    pl.add_argument("--connections", type=int, default=8, help="parallel HTTP connections (default: 8)")
    ver = sub.add_parser("verify", help="re-check every file of an artifact against its manifest")
    ver.add_argument("artifact", type=Path)
    args = p.parse_args(argv)
    if getattr(args, "tp", None) is not None and args.tp < 1:
        p.error(f"--tp {args.tp}: must be a positive integer")
    if getattr(args, "connections", 1) < 1:
        p.error(f"--connections {args.connections}: must be a positive integer")
    return args


def say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def cmd_publish(args) -> None:
    from llama_aot.artifacts.publish import publish

    done = publish(args.artifact, args.store, args.name)
    e = done.entry
    print(f"published {e.name} (sha256:{e.digest}) to {args.store}: {len(e.files)} files, {e.size / 1e6:.1f} MB; "
          f"{done.new_blobs} new blobs ({done.new_bytes / 1e6:.1f} MB), {len(e.files) - done.new_blobs} already there"
          + ("; replaced the previous artifact of that name" if done.replaced else ""))


def cmd_list(args) -> None:
    from llama_aot.artifacts.pull import describe
    from llama_aot.artifacts.store_match import best, misfits, this_machine
    from llama_aot.artifacts.store_ref import parse_ref
    from llama_aot.artifacts.store_source import open_source

    ref = parse_ref(args.ref)
    source = open_source(ref)
    try:
        entries = sorted(source.read_index().artifacts.values(), key=lambda e: e.name)
    finally:
        source.close()
    host = this_machine()
    reasons = {e.name: misfits(e.target, host, args.tp) for e in entries}
    fits = [e for e in entries if not reasons[e.name]]
    pick = best(fits, host).name if fits else None
    print(f"{ref.store}: {len(entries)} artifacts; this machine: {host.describe()}")
    for e in entries:
        mark = "*" if e.name == pick else " "
        verdict = ("fits, pull picks it" if e.name == pick else "fits") if not reasons[e.name] else \
            "does not fit: " + ", ".join(reasons[e.name])
        print(f"{mark} {e.name}  sha256:{e.digest}  {describe(e)}  {e.size / 1e6:.1f} MB  {verdict}")


def cmd_pull(args) -> None:
    from llama_aot.artifacts.pull import cache_dir, pull
    from llama_aot.artifacts.store_ref import parse_ref

    try:
        done = pull(parse_ref(args.ref), args.output, tp=args.tp, connections=args.connections, say=say)
    except KeyboardInterrupt:
        raise ArtifactError(f"interrupted; what was received waits in {cache_dir() / 'blobs'}: run the same command "
                            "again to resume") from None
    e = done.entry
    if done.already:
        print(f"{done.path} already holds {e.name} (sha256:{e.digest})")
        return
    rate = done.downloaded / done.seconds / 1e6 if done.seconds else 0.0
    print(f"pulled {e.name} (sha256:{e.digest}) into {done.path}: {len(e.files)} files, {e.size / 1e6:.1f} MB; "
          f"received {done.downloaded / 1e6:.1f} MB in {done.seconds:.2f} s ({rate:.0f} MB/s)")


def cmd_verify(args) -> None:
    from llama_aot.artifacts.digest import check_files, hash_file
    from llama_aot.artifacts.manifest import MANIFEST_FILE, read_manifest
    from llama_aot.artifacts.store_index import target_of
    from llama_aot.artifacts.store_match import misfits, this_machine

    if not args.artifact.is_dir():
        raise ArtifactError(f"{args.artifact}: no such artifact directory")
    manifest = read_manifest(args.artifact)
    check_files(args.artifact, manifest.files)
    digest = hash_file(args.artifact / MANIFEST_FILE)["root_sha256"]
    reasons = misfits(target_of(manifest), this_machine())
    print(f"{args.artifact}: {len(manifest.files) + 1} files match (sha256:{digest}); "
          + ("this machine can run it" if not reasons else "this machine cannot run it: " + ", ".join(reasons)))


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        {"publish": cmd_publish, "list": cmd_list, "pull": cmd_pull, "verify": cmd_verify}[args.command](args)
    except (ArtifactError, ConfigError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
