"""Commands for a key server's operator: serve, resources, policies, the audit log, KEK rotation."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .args import add_evidence_options, audit_head, listen, load_evidence, verification_context
from .show import check_lines


def _serve(args: argparse.Namespace) -> int:
    import logging
    from dataclasses import fields

    from ..server import config
    from ..server.serve import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {}
    for name in (field.name for field in fields(config.ServerConfig)):
        value = getattr(args, name)
        flags[name] = tuple(value) if isinstance(value, list) else value
    run(config.load(args.config, flags))
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from ..server.config import DEFAULT_CACHE, DEFAULT_DB, DEFAULT_KDS
    from ..server.ratelimit import DEFAULT_BURST, DEFAULT_RATE

    p = sub.add_parser("serve", help="run the key server (KBS RCAR 0.4.0, admin API, metrics)",
                       description="Run the key server: /kbs/v0/auth, /attest and /resource for guests; "
                                   "/admin/v1 for operators; /metrics, /healthz and /readyz. Every option "
                                   "can also be set in --config FILE (TOML, same names without dashes).")
    p.add_argument("--config", type=Path, metavar="FILE", help="server configuration (TOML); flags win over it")
    p.add_argument("--listen", type=listen, metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:8080); plain HTTP only on loopback")
    p.add_argument("--db", help=f"database URL: sqlite:///PATH or postgresql://… (default {DEFAULT_DB})")
    p.add_argument("--name", help="this replica's name in the audit log (default HOSTNAME:PORT)")
    p.add_argument("--trust-roots", type=Path, action="append", metavar="DIR",
                   help="extra trust anchors: root certificates and CCA platform keys (repeatable)")
    p.add_argument("--certs", type=Path, action="append", metavar="DIR",
                   help="folder of vendor certificates (VCEK/VLEK, ASK, ARK) to use when evidence lacks them, "
                        "and AMD's CRLs (.crl files) to check")
    p.add_argument("--kds-url", help=f"AMD KDS for VCEKs and chains the evidence lacks and the ARKs' CRLs (default "
                                     f"{DEFAULT_KDS}; '' to never fetch)")
    p.add_argument("--cache-dir", type=Path, help=f"cache for KDS certificates and PCS collateral (default "
                                                  f"{DEFAULT_CACHE})")
    p.add_argument("--pcs-url", help="Intel PCS or PCCS base URL for TDX collateral (TCB status); default: TDX "
                                     "TCB status is not evaluated")
    p.add_argument("--collateral", type=Path, metavar="DIR",
                   help="offline TDX collateral (TCB info, QE identity, CRLs, TCB signing chain); wins over --pcs-url")
    p.add_argument("--policy", type=Path, metavar="FILE",
                   help="release policy (JSON) to make active at start when it differs from the active one; "
                        "default: keep the database's (none at first: nothing is released until one is set)")
    p.add_argument("--tls-cert", type=Path, help="TLS certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, help="TLS private key (PEM)")
    p.add_argument("--kek-file", type=Path, metavar="FILE",
                   help="key-encryption key for resources at rest: 32 bytes (default: the systemd credential kek)")
    p.add_argument("--old-kek-file", type=Path, action="append", metavar="FILE",
                   help="a previous KEK, still accepted for reading during a rotation (repeatable)")
    p.add_argument("--admin-token-file", type=Path, metavar="FILE",
                   help="admin tokens, one per line (default: the systemd credential admin-token; "
                        "without either the admin API refuses every call)")
    p.add_argument("--token-key-file", type=Path, metavar="FILE",
                   help="EC P-256 private key (PEM) signing attestation tokens, shared by replicas (default: "
                        "the systemd credential token-key, else an ephemeral key)")
    p.add_argument("--rate-limit", type=float, metavar="PER_SECOND",
                   help=f"unauthenticated requests per second and peer address (default {DEFAULT_RATE:g}; 0: no "
                        "limit); raise it behind a proxy, where every guest has the proxy's address")
    p.add_argument("--rate-burst", type=int, metavar="N",
                   help=f"unauthenticated requests a peer may make at once (default {DEFAULT_BURST})")
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes serving requests (default: one per CPU)")
    p.set_defaults(run=_serve)


def _add_store_options(p: argparse.ArgumentParser, *, remote: bool) -> None:
    from ..server.config import DEFAULT_DB

    p.add_argument("--db", default=DEFAULT_DB, help=f"database URL (default {DEFAULT_DB})")
    p.add_argument("--kek-file", type=Path, metavar="FILE",
                   help="key-encryption key (resources: put, get; policies: put, rm; default: the systemd "
                        "credential kek)")
    p.add_argument("--old-kek-file", type=Path, action="append", default=[], metavar="FILE",
                   help="a previous KEK (repeatable)")
    if remote:
        p.add_argument("--server", metavar="URL", help="manage a running key server through its admin API "
                                                       "instead of the database")
        p.add_argument("--admin-token-file", type=Path, metavar="FILE", help="with --server: the admin token")
        p.add_argument("--ca", type=Path, metavar="FILE", help="with --server: CA bundle for its TLS certificate")


def _administrator(args: argparse.Namespace, *, values: bool = False) -> Any:
    """The admin API client with --server, else local administration of --db (KEK only for values)."""
    if getattr(args, "server", None):
        from ..server.admin_client import AdminClient

        if not args.admin_token_file:
            raise SystemExit(f"keybroker {args.command}: --server needs --admin-token-file")
        return AdminClient(args.server, args.admin_token_file, ca=args.ca)
    import getpass
    import socket

    from ..server.admin import Admin
    from ..server.sealing import load_sealer
    from ..server.store import Store

    sealer = load_sealer(args.kek_file, args.old_kek_file) if values else None
    return Admin(Store(args.db, sealer), sealer, f"local:{getpass.getuser()}", f"cli@{socket.gethostname()}")


def _resource(args: argparse.Namespace) -> int:
    if args.action == "list":
        for info in _administrator(args).list_resources():
            if info.altered:
                print(f"{info.path}\tALTERED: a column holds what keybroker never writes there (edited)")
            else:
                print(f"{info.path}\t{info.size} bytes" + (f"\tlease {info.lease} s" if info.lease else ""))
    elif args.action == "put":
        value = _read_value(args.file)
        _administrator(args, values=True).put_resource(args.path, value, args.lease)
    elif args.action == "get":
        if args.server:
            raise SystemExit("keybroker resource get: values are read only locally (--db with --kek-file); "
                             "the admin API never returns them")
        value = _administrator(args, values=True).read_resource(args.path)
        if value is None:
            raise SystemExit(f"keybroker resource get: no resource {args.path}")
        if args.file:
            try:  # a new file of the caller's only: never through a link, never over what is there
                fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                raise SystemExit(f"keybroker resource get: {args.file} exists; name a new file") from None
            with os.fdopen(fd, "wb") as f:
                f.write(value)
        else:
            sys.stdout.buffer.write(value)
    elif not _administrator(args).delete_resource(args.path):
        raise SystemExit(f"keybroker resource rm: no resource {args.path}")
    return 0


def _read_value(path: Path | None) -> bytes:
    """A resource's value from ``path`` (else stdin), read no further than a resource may be: /dev/zero, or
    a pipe that does not end, is refused, not read until memory runs out."""
    from ..errors import AdminError
    from ..files import read_bounded
    from ..wire.resource import VALUE_MAX

    if path is not None:
        return read_bounded(path, VALUE_MAX, "resource value", AdminError)
    value = sys.stdin.buffer.read(VALUE_MAX + 1)
    if len(value) > VALUE_MAX:
        raise AdminError(f"standard input holds more than {VALUE_MAX} bytes: a resource is 1 to "
                         f"{VALUE_MAX} bytes (the kernel's limit for a key)")
    return value


def _add_resource(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resource", help="manage the key server's resources",
                       description="Put, get, remove or list resources: in the database (--db; values sealed "
                                   "under --kek-file) or through a running server's admin API (--server).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    put = actions.add_parser("put", help="store the value of a resource (from --file, or stdin)")
    put.add_argument("--file", type=Path, help="read the value from FILE (default stdin)")
    put.add_argument("--lease", type=int, help="seconds the released key stays valid in the keyring")
    get = actions.add_parser("get", help="print a resource's value (locally only, with the KEK)")
    get.add_argument("--file", type=Path, help="write the value to a new FILE (mode 0600) instead of stdout")
    actions.add_parser("rm", help="remove a resource")
    actions.add_parser("list", help="list the resources: path, size, lease")
    for action in ("put", "get", "rm"):
        actions.choices[action].add_argument("path", metavar="REPO/TYPE/TAG")
    for action in ("put", "get", "rm", "list"):
        _add_store_options(actions.choices[action], remote=True)
    p.set_defaults(run=_resource)


def _policy(args: argparse.Namespace) -> int:
    import datetime as dt

    from ..server.policy import Policy

    if args.action == "check":
        return _policy_check(args)
    if args.action == "from-evidence":
        return _policy_from_evidence(args)
    admin = _administrator(args, values=args.action in ("put", "rm"))  # a policy is stored with a MAC under the KEK
    if args.action == "put":
        text = _read_policy(args.file)
        _warn_unpinned(Policy.loads(text))
        version, changed = admin.put_policy(text)
        print(f"policy version {version} is active" + ("" if changed else " (unchanged)"))
    elif args.action == "rm":
        version, changed = admin.reset_policy()
        print(f"policy version {version} is active: no rules, nothing is released" +
              ("" if changed else " (unchanged)"))
    elif args.action == "get":
        stored = admin.get_policy(args.version)
        if stored is None:
            raise SystemExit(f"keybroker policy get: there is no policy version {args.version}")
        print(stored.policy.dumps())
    else:
        for info in admin.list_policies():
            when = dt.datetime.fromtimestamp(info.created, dt.UTC).isoformat(timespec="seconds")
            print(f"{info.version}\t{info.digest[:16]}\t{when if info.version else '-'}\t{info.actor}")
    return 0


def _warn_unpinned(policy: Any) -> None:
    for warning in policy.unpinned():
        print(f"keybroker policy: warning: {warning}", file=sys.stderr)


def _policy_from_evidence(args: argparse.Namespace) -> int:
    import datetime as dt

    from ..server.policy import from_appraisals
    from ..verifier import verify

    appraisals = []
    for path in args.evidence:
        verdict = verify(load_evidence(path), verification_context(args))
        if not verdict.ok:
            raise SystemExit(f"keybroker policy from-evidence: {path} does not verify ({verdict.reason()}); "
                             "a policy must not pin what no genuine TEE vouched for")
        if verdict.claims.get("debug") is not False:
            raise SystemExit(f"keybroker policy from-evidence: {path} is from a debug guest, whose memory its host "
                             "can read; no release policy should name it")
        appraisals.append(verdict.claims)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    names = ", ".join(path.name for path in args.evidence)
    policy = from_appraisals(appraisals, args.resources, f"from the evidence {names}, {when}")
    print(policy.dumps())
    return 0


def _read_policy(path: Path) -> bytes:
    from ..errors import PolicyError
    from ..files import read_bounded
    from ..server.policy import POLICY_MAX

    return read_bounded(path, POLICY_MAX, "policy", PolicyError)


def _policy_check(args: argparse.Namespace) -> int:
    import json

    from ..server.policy import Policy
    from ..verifier import verify
    from ..wire.resource import ResourcePath

    resource = str(ResourcePath.parse(args.resource))  # a name the server refuses (400) is asked of no policy
    policy = Policy.loads(_read_policy(args.policy))
    _warn_unpinned(policy)
    verdict = verify(load_evidence(args.evidence), verification_context(args))
    print("evidence (the binding to a session's nonce is the server's to check):")
    print("\n".join(check_lines(verdict, "  ")))
    if not verdict.ok:
        print(f"=> DENY: the evidence does not verify ({verdict.reason()}); the policy is not consulted")
        return 1
    print(f"claims: {json.dumps(verdict.claims, sort_keys=True)}" if args.claims else
          f"claims: {len(verdict.claims)} (show them with --claims)")
    print(f"policy (sha256 {policy.digest[:16]}) for {resource}:")
    for line in policy.explain(resource, verdict.claims):
        print(line)
    return 0 if policy.decide(resource, verdict.claims).allowed else 1


def _add_policy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="check a release policy offline; set, show, list or remove the active one",
                       description="Release policies (JSON, see docs/policy.md). `check` evaluates one "
                                   "against evidence offline and explains every condition; the others manage "
                                   "the versions in the database (--db) or on a server (--server).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="verify EVIDENCE and explain POLICY's decision for a resource")
    check.add_argument("policy", type=Path, metavar="POLICY")
    check.add_argument("evidence", type=Path, metavar="EVIDENCE",
                       help="an evidence envelope (keybroker evidence) or Trustee's evidence form")
    check.add_argument("--resource", required=True, metavar="REPO/TYPE/TAG", help="the resource asked for")
    add_evidence_options(check)
    check.add_argument("--claims", action="store_true", help="print the appraised claims")
    start = actions.add_parser("from-evidence", help="print a starting policy that pins the image of verified guests",
                               description="Verify each EVIDENCE (an envelope or Trustee's form) and print a policy "
                                           "that releases RESOURCES to guests running the same image: SEV-SNP "
                                           "MEASUREMENT and HOST_DATA, TDX MRTD, MRCONFIGID and RTMR0-2, CCA RIM and "
                                           "personalization value; SNP guests at VMPL0 without a migration agent, "
                                           "TDX TCBs not out of date and TDs not migratable.")
    start.add_argument("evidence", type=Path, nargs="+", metavar="EVIDENCE", help="an evidence envelope")
    start.add_argument("--resources", required=True, action="append", metavar="PATTERN",
                       help="resources the guests may obtain ('*' matches anything, '/' included; repeatable)")
    add_evidence_options(start)
    put = actions.add_parser("put", help="make the policy in FILE the active version")
    put.add_argument("file", type=Path, metavar="FILE")
    get = actions.add_parser("get", help="print the active policy (or --version N)")
    get.add_argument("--version", type=int, metavar="N")
    actions.add_parser("list", help="list the policy versions: version, digest, time, who set it")
    actions.add_parser("rm", help="remove the release policy (a new version without rules: nothing is released)")
    for action in ("put", "get", "list", "rm"):
        _add_store_options(actions.choices[action], remote=True)
    p.set_defaults(run=_policy)


def _audit(args: argparse.Namespace) -> int:
    import json

    from ..server import audit
    from ..server.schema import open_existing

    engine = open_existing(args.db)  # read-only: checking a log must not create or mend one
    if args.action == "head":
        seq, digest = audit.head(engine)
        print(f"{seq}:{digest}")
        return 0
    if args.action == "verify":
        result = audit.verify(engine, args.known_head)
        for problem in result.problems:
            print(f"BROKEN: {problem}")
        print(f"{'audit log intact' if result.ok else 'audit log BROKEN'}: {result.records} records; head "
              f"{result.head_seq}:{result.head_hash} (keep it elsewhere; --known-head detects a rewrite later)")
        return 0 if result.ok else 1
    for record in audit.records(engine, after=args.after, limit=args.limit):
        # default=str: a column an edit gave another type (SQLite keeps any) is shown, as verify names it
        print(json.dumps(record.to_json(), sort_keys=True, default=str) if args.json else record.line())
    return 0


def _add_audit(sub: argparse._SubParsersAction) -> None:
    from ..server.config import DEFAULT_DB

    p = sub.add_parser("audit", help="list, verify or export the head of the key server's audit log",
                       description="The audit log: one record per attestation, release, refusal and admin action, "
                                   "each chained to the previous one by hash. `verify` exits 1 when a record was "
                                   "edited or removed; `head` prints SEQ:HASH of the last record, to keep outside "
                                   "the database and give to `verify --known-head` later.")
    p.add_argument("action", choices=["list", "verify", "head"])
    p.add_argument("--known-head", type=audit_head, metavar="SEQ:HASH",
                   help="verify: a head kept earlier; the chain must still hold that record")
    p.add_argument("--db", default=DEFAULT_DB, help=f"database URL (default {DEFAULT_DB})")
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="list: records after SEQ")
    p.add_argument("--limit", type=int, metavar="N", help="list: at most N records")
    p.add_argument("--json", action="store_true", help="list: one JSON object per line")
    p.set_defaults(run=_audit)


def _rotate_kek(args: argparse.Namespace) -> int:
    record = _administrator(args, values=True).rotate_kek()
    print(record.event.reason)
    return 0


def _add_rotate_kek(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rotate-kek", help="re-wrap every resource under a new key-encryption key",
                       description="Re-seal every resource that is not under --kek-file (the new KEK) with it, "
                                   "opening them with the --old-kek-file KEKs, in one transaction. Servers keep "
                                   "serving when they were given both (--kek-file NEW --old-kek-file OLD).")
    _add_store_options(p, remote=False)
    p.set_defaults(run=_rotate_kek)


def add_commands(sub: argparse._SubParsersAction) -> None:
    for add in (_add_serve, _add_resource, _add_policy, _add_audit, _add_rotate_kek):
        add(sub)
