"""Security (docs/threat-model.md): configs and policies are data, the perf DB is untrusted, no network.

Three kinds of test:

* source scans over ``src/layerzero`` (AST, not regexes): no ``eval``/``exec``/``__import__``, no
  unsafe YAML loaders, no pickle/marshal/``torch.load``, no shell, imports only of fixed module names,
  and SQL that is parameterized (text only from constants);
* one subprocess that installs an audit hook (``sys.addaudithook``) and a ``socket.socket.connect``
  that refuses every non-loopback address *before* ``import layerzero``, then imports it in full and
  runs every operation, ``dispatch()``, the doctor, tuning into a perf DB, a hot-reload dispatcher, the
  metrics endpoint (scraped over loopback) and config / policy files full of injection payloads and
  names of bait files (a Python module on ``sys.path`` that would leave a marker if imported, a YAML
  file, a pickle); the parent then checks what the hook saw;
* in-process tests that push payloads through every string a config can carry (kernel ids, globs,
  ``_match`` regexes with catastrophic backtracking, condition expressions, file paths) and hostile
  rows and lookups through the perf DB.
"""

from __future__ import annotations

import ast
import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import layerzero as lz
from layerzero.errors import ConditionError, ConfigError, LayerZeroError, PolicyError
from layerzero.policy.config_schema import compile_safe_regex, load_config
from layerzero.policy.document import load_policy
from layerzero.tuning.perfdb import MAX_TEXT, PerfDB, Record

SRC = Path(lz.__file__).resolve().parent
MARK = "LZ_PAYLOAD"


def sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(SRC.rglob("*.py"))]


def rel(path: Path) -> str:
    return str(path.relative_to(SRC.parent))


def dotted(node: ast.AST) -> str:
    try:
        return ast.unparse(node)
    except Exception:  # pragma: no cover - every node of a parsed module unparses
        return ""


# -- source scans --------------------------------------------------------------------------------------------

FORBIDDEN_CALLS = {"eval", "exec", "__import__", "yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load",
                   "yaml.unsafe_load_all", "yaml.full_load_all", "torch.load", "os.system", "os.popen",
                   "os.execv", "os.execvp", "os.spawnv", "pickle.load", "pickle.loads", "marshal.loads",
                   "shelve.open", "runpy.run_path", "runpy.run_module", "importlib.machinery.SourceFileLoader",
                   "importlib.util.spec_from_file_location"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib", "runpy"}


# The one reviewed exception: the call-contract generator compiles the ``lz.*`` entry functions from the
# CallContract declarations in layerzero/ops/*.py (module constants of our own, never user or config input),
# as ``dataclasses`` generates methods; ``build`` also refuses expressions with calls or dunder names it does
# not expect (tests/test_call_contract.py).
CODEGEN_SITES = {"layerzero/ops/contract.py": {"exec", "compile"}}


def test_no_code_execution_primitives() -> None:
    found = []
    for path, tree in sources():
        allowed = CODEGEN_SITES.get(rel(path), set())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and dotted(node.func) in FORBIDDEN_CALLS - allowed:
                found.append(f"{rel(path)}:{node.lineno}: {dotted(node.func)}(...)")
            if isinstance(node, ast.Call) and dotted(node.func) == "compile" and "compile" not in allowed:
                found.append(f"{rel(path)}:{node.lineno}: builtin compile(...)")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    if name.split(".")[0] in FORBIDDEN_MODULES:
                        found.append(f"{rel(path)}:{node.lineno}: import {name}")
            if isinstance(node, ast.keyword) and node.arg == "shell" and dotted(node.value) != "False":
                found.append(f"{rel(path)}:{node.value.lineno}: shell={dotted(node.value)}")
            if isinstance(node, ast.Attribute) and dotted(node) in ("yaml.Loader", "yaml.UnsafeLoader",
                                                                  "yaml.FullLoader", "yaml.CLoader"):
                found.append(f"{rel(path)}:{node.lineno}: {dotted(node)}")
    assert found == []


#: The guard-text builders (``layerzero.ops.base``) a declaration may call, with string and bool constants only.
GUARD_BUILDERS = ("dense_guard", "number_guard")


def _constant_text(node: ast.AST) -> bool:
    """String constants, joined (``+``) or built by a guard builder from constants; no formatted values."""
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and node.func.id in GUARD_BUILDERS and all(
            isinstance(a, ast.Constant) for a in [*node.args, *(k.value for k in node.keywords)])
    if isinstance(node, ast.BinOp):
        return _constant_text(node.left) and _constant_text(node.right)
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def test_code_generation_only_from_our_own_contracts() -> None:
    """``exec`` appears once, in the contract generator, and is fed only CallContract declarations made
    in layerzero's own op modules from string constants (joined, or passed through the guard builders)."""
    sites = []
    for path, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and dotted(node.func) in ("exec", "compile"):
                sites.append(rel(path))
            if isinstance(node, ast.Call) and dotted(node.func) == "CallContract":
                assert rel(path).startswith("layerzero/ops/"), rel(path)
                for kw in node.keywords:
                    if kw.arg in ("family", "shape", "guard", "family_guard", "direct", "direct_when", "prologue",
                                  "result", "operation", "args", "signature"):
                        assert _constant_text(kw.value), \
                            f"{rel(path)}:{kw.value.lineno}: {kw.arg} must be a string constant"
    assert sorted(set(sites)) == ["layerzero/ops/contract.py"]


def test_yaml_is_parsed_with_safe_load_only() -> None:
    uses = set()
    for _path, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "yaml":
                uses.add(node.attr)
    # SafeLoader: the loader safe_load uses, composing nodes only (the duplicate-key and alias check reads them)
    assert uses <= {"safe_load", "safe_dump", "safe_dump_all", "YAMLError", "MarkedYAMLError", "SafeLoader",
                    "MappingNode", "SequenceNode", "ScalarNode"}
    assert "safe_load" in uses


# Modules imported by a name that is not a literal: each is a fixed table in its own file (reviewed).
DYNAMIC_IMPORTS = {
    "layerzero/telemetry/__init__.py": "the fixed lazy-attribute table",
    "layerzero/backends/flash_attn.py": "'flash_attn' or 'flash_attn_interface' from a fixed tuple",
    "layerzero/backends/flash_attn_pairs.py": "FA2_MODULE or FA3_MODULE, the module constants of its residual pairs",
    "layerzero/backends/liger.py": "liger_kernel submodules from a fixed table",
    "layerzero/backends/__init__.py": "f'layerzero.backends.{name}' over BUILTIN_BACKENDS",
    "layerzero/__init__.py": "a moved name's home module from the fixed _MOVED table (deprecated spellings)",
    "layerzero/dispatch/__init__.py": "f'layerzero.dispatch.{module}' over the fixed _LAZY table, homes in _DEPRECATED",
    "layerzero/dispatch/orchestrator.py": "f'layerzero.dispatch.{modname}' over the fixed _FACTORIES table",
    "layerzero/integrations/transformers.py": "transformers' own modeling modules over the fixed _KNOWN_GOOD table",
}


def test_imports_only_fixed_module_names() -> None:
    dynamic = {}
    for path, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and dotted(node.func) in ("importlib.import_module", "import_module"):
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    continue
                if isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant) and \
                        str(arg.values[0].value).startswith("layerzero."):
                    dynamic.setdefault(rel(path), []).append(dotted(arg))
                    continue
                dynamic.setdefault(rel(path), []).append(dotted(arg))
    assert set(dynamic) <= set(DYNAMIC_IMPORTS), {k: v for k, v in dynamic.items() if k not in DYNAMIC_IMPORTS}


# Interpolations allowed in SQL text: constants of the module, never a value from a row, a file or a caller.
SQL_INTERPOLATIONS = {"int(self.busy_timeout_s * 1000)", "self.read_busy_ms", "int(read_busy_ms)", "APPLICATION_ID",
                      "SCHEMA_VERSION", "MAX_TEXT + 1", "cut"}


def test_sql_is_parameterized() -> None:
    calls = 0
    for path, tree in sources():
        constants = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                     if isinstance(t, ast.Name) and t.id.isupper()}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("execute", "executemany", "executescript")):
                continue
            calls += 1
            where = f"{rel(path)}:{node.lineno}"
            assert node.func.attr != "executescript", where
            sql = node.args[0]
            if isinstance(sql, ast.Constant) and isinstance(sql.value, str):
                continue
            if isinstance(sql, ast.Name):
                assert sql.id in constants or sql.id == "stmt" or sql.id == "sql", where
                continue
            assert isinstance(sql, ast.JoinedStr), f"{where}: SQL built by {type(sql).__name__}"
            for part in sql.values:
                if isinstance(part, ast.FormattedValue):
                    assert dotted(part.value) in SQL_INTERPOLATIONS, f"{where}: interpolates {dotted(part.value)}"
    assert calls >= 10


def test_sql_variables_hold_constant_text() -> None:
    """The two SQL variables (``sql`` in PerfDB.rows / PerfDB._read, ``stmt`` over _SCHEMA) hold constant text."""
    tree = ast.parse((SRC / "tuning" / "perfdb.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "sql" for t in node.targets):
            value = node.value
            parts = [value] if not isinstance(value, ast.BinOp) else [value.left, value.right]
            for part in parts:
                if isinstance(part, ast.JoinedStr):
                    for v in part.values:
                        if isinstance(v, ast.FormattedValue):
                            assert dotted(v.value) in SQL_INTERPOLATIONS
                else:
                    assert isinstance(part, ast.Constant)
        if isinstance(node, ast.For) and dotted(node.target) == "stmt":
            assert dotted(node.iter) == "_SCHEMA"


# -- one full run in a guarded subprocess ---------------------------------------------------------------------

PROBE = r'''
import ipaddress, json, os, socket, sys

BAIT = sys.argv[1]
sys.path.insert(0, BAIT)  # an import of lz_evil_module would succeed (and leave a marker) if anything tried it
seen = {"connect": [], "blocked": [], "getaddrinfo": [], "bait_open": [], "bait_import": [], "payload_compiled": [],
        "subprocess": [], "unpickle": []}


def hook(event, args):
    if event == "socket.connect":
        seen["connect"].append(repr(args[1]))
    elif event == "socket.getaddrinfo":
        seen["getaddrinfo"].append(str(args[0]))
    elif event == "open" and args and "lz_evil" in str(args[0]):
        seen["bait_open"].append(str(args[0]))
    elif event == "import" and "lz_evil" in str(args[0]):
        seen["bait_import"].append(str(args[0]))
    elif event == "compile" and args and "LZ_PAYLOAD" in str(args[0]):
        seen["payload_compiled"].append(str(args[0])[:200])
    elif event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn"):
        seen["subprocess"].append(repr(args)[:300])
    elif event == "pickle.find_class":
        seen["unpickle"].append(repr(args))


sys.addaudithook(hook)
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _loopback(sock, address):
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return True
    host = address[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def guarded_connect(self, address):
    if not _loopback(self, address):
        seen["blocked"].append(repr(address))
        raise OSError("network access refused by test_security")
    return _connect(self, address)


def guarded_connect_ex(self, address):
    if not _loopback(self, address):
        seen["blocked"].append(repr(address))
        return 111
    return _connect_ex(self, address)


socket.socket.connect, socket.socket.connect_ex = guarded_connect, guarded_connect_ex

import torch
import layerzero as lz                                   # the full import
from layerzero.dispatch import create_hot_reload_dispatcher, dispatch
from layerzero.errors import LayerZeroError

g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g)
q, k, v = r(1, 4, 8, 16), r(1, 2, 8, 16), r(1, 2, 8, 16)
x, w = r(4, 32), torch.rand(32) + 0.5
cos, sin = torch.ones(8, 16), torch.zeros(8, 16)
calls = [
    lambda: lz.attention(q, k, v, is_causal=True), lambda: lz.attention(q, q, q), lambda: lz.rms_norm(x, w),
    lambda: lz.layer_norm(x, w), lambda: lz.rope(q, cos, sin), lambda: lz.swiglu(x, x), lambda: lz.gelu(x),
    lambda: lz.silu(x), lambda: lz.sample(x, temperature=0.0), lambda: lz.sample(x, temperature=0.7, top_p=0.9),
    lambda: dispatch("attention.causal", {"query": q, "key": k, "value": v}).output,
    lambda: dispatch("rms_norm", {"x": x, "weight": w}).output,
]
done = 0
for c in calls:
    c()
    done += 1
lz.doctor()
lz.readiness_check()
str(lz.explain(q, k, v, operation="attention.causal"))
db = lz.tuning.use_perf_db(os.path.join(BAIT, "perf.db"))
lz.tuning.tune(["rms_norm"], shapes=["rows=8,hidden=64"], device="cpu", budget_s=5)
lz.rms_norm(x, w)

from layerzero.telemetry.prometheus import start_metrics_server
import urllib.request
server = start_metrics_server(0)
metrics_addr = server.addr
bound = server._httpd.server_address[0]
with urllib.request.urlopen(server.url, timeout=10) as resp:
    scraped = b"layerzero" in resp.read()
server.close()

# injection: every string a config can carry, each a payload or the name of a bait file
evil_module = "lz_evil_module"
evil_yaml = os.path.join(BAIT, "lz_evil_policy.yaml")
evil_pickle = os.path.join(BAIT, "lz_evil_data.pkl")
payloads = ["__import__('os').system('LZ_PAYLOAD')", "LZ_PAYLOAD; rm -rf /", "$(LZ_PAYLOAD)", evil_module,
            evil_yaml, evil_pickle, "../../lz_evil_module.py", "!!python/object/apply:os.system ['LZ_PAYLOAD']",
            "{{LZ_PAYLOAD}}", "${LZ_PAYLOAD}", "lz_evil_module:main", "lambda: 'LZ_PAYLOAD'"]
rejected = accepted = 0
for p in payloads:
    docs = [
        {"version": "1.0", "locks": [{"operation": p, "kernel": "torch_rms_norm"}]},
        {"version": "1.0", "locks": [{"operation": "rms_norm", "kernel": p}]},
        {"version": "1.0", "locks": [{"operation": "rms_norm", "backend": p}]},
        {"version": "1.0", "denies": [{"operation": "*", "kernels": [p], "backends": [p]}]},
        {"version": "1.0", "boosts": [{"backend": p, "boost_factor": 2.0, "condition": p}]},
        {"version": "1.0", "locks": [{"operation": "rms_norm", "kernel": "torch_rms_norm", "condition": p}]},
        {"version": "1.0", "description": p, "allows": [{"operation": "rms_norm", "backends": ["torch"]}]},
        {"version": "1.0", "dispatch_rules": [{"operation": "rms_norm", "kernel": p, "conditions": p}]},
        {"version": "1.0", "dispatch_rules": [{"operation": "rms_norm", "kernel": "torch_rms_norm",
                                               "conditions": {"operation_match": p, "dtype": p}}]},
        {"version": "1.0", "defaults": {"fallback_kernel": p}, "fallback_chains": {p: [p]}},
        {"version": "1.0", "kernel_locks": {p: p}, "kernel_denies": [p], "kernel_allows": [p, "torch_*"]},
        {"version": "1.0", "description": p},
    ]
    for d in docs:
        try:
            lz.configure(d)
            accepted += 1
        except LayerZeroError:
            rejected += 1
        try:
            lz.rms_norm(x, w)  # an accepted lock on a backend that does not exist is honoured: no kernel
        except LayerZeroError:
            pass
        lz.configure(None)
    text = "version: '1.0'\ndescription: " + json.dumps(p) + "\nlocks:\n  - operation: rms_norm\n    kernel: " + \
        json.dumps(p) + "\n"
    path = os.path.join(BAIT, "kernels.yaml")
    open(path, "w").write(text)
    try:
        lz.configure(path)
        accepted += 1
    except LayerZeroError:
        rejected += 1
    lz.configure(None)
tagged = os.path.join(BAIT, "tagged.yaml")
open(tagged, "w").write("version: '1.0'\nlocks: !!python/object/apply:os.system ['LZ_PAYLOAD']\n")
try:
    lz.configure(tagged)
except LayerZeroError:
    rejected += 1
hot = os.path.join(BAIT, "hot.yaml")
open(hot, "w").write("version: '1.0'\nkernel_locks: {rms_norm: torch_rms_norm}\n")
d = create_hot_reload_dispatcher(config_path=hot, start_watching=False)
open(hot, "w").write("version: '1.0'\nkernel_locks: !!python/object/new:lz_evil_module.Evil []\n")
reload_ok = d.reload()
d.close()
print(json.dumps({"seen": seen, "calls": done, "metrics_addr": metrics_addr, "bound": bound, "scraped": scraped,
                  "rejected": rejected, "accepted": accepted, "reload_ok": reload_ok,
                  "marker": os.path.exists(os.path.join(BAIT, "IMPORTED")),
                  "modules": sorted(m for m in sys.modules if "lz_evil" in m)}))
'''


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    bait = tmp_path_factory.mktemp("bait")
    (bait / "lz_evil_module.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(bait / "IMPORTED")!r}).write_text("imported")
        class Evil:
            pass
    """))
    (bait / "lz_evil_policy.yaml").write_text('version: "1.0"\nlocks: [{operation: "*", kernel: torch_sdpa_math}]\n')
    (bait / "lz_evil_data.pkl").write_bytes(b"\x80\x04K\x01.")
    (bait / "probe.py").write_text(PROBE)
    proc = subprocess.run([sys.executable, str(bait / "probe.py"), str(bait)], capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "LAYERZERO_PERF_DB": str(bait / "default.db"),
                                            "HOME": str(bait), "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["bait"] = str(bait)
    return report


def test_full_import_and_dispatch_make_no_network_access(guarded_run: dict[str, Any]) -> None:
    seen = guarded_run["seen"]
    assert guarded_run["calls"] == 12
    assert seen["blocked"] == []  # nothing even tried to reach another host
    assert all("127.0.0.1" in c or "::1" in c for c in seen["connect"])
    assert seen["connect"]  # the loopback metrics scrape did connect: the guard was live
    assert all(h in ("127.0.0.1", "localhost", "::1") for h in seen["getaddrinfo"])


def test_metrics_endpoint_binds_to_loopback_by_default(guarded_run: dict[str, Any]) -> None:
    assert guarded_run["metrics_addr"] == "127.0.0.1" and guarded_run["bound"] == "127.0.0.1"
    assert guarded_run["scraped"]


def test_configs_are_data_never_code(guarded_run: dict[str, Any]) -> None:
    seen = guarded_run["seen"]
    assert seen["payload_compiled"] == []   # no payload ever reached compile/eval/exec
    assert seen["bait_import"] == [] and guarded_run["modules"] == [] and not guarded_run["marker"]
    assert seen["bait_open"] == []          # paths named in configs are never opened
    assert seen["unpickle"] == []
    # the one process started is the stdlib's platform.processor() asking `uname -p` (hardware fingerprint)
    assert all(s.startswith("('uname', ['uname', '-p']") for s in seen["subprocess"])
    assert guarded_run["rejected"] > 0 and guarded_run["accepted"] > 0  # both outcomes were exercised
    assert guarded_run["reload_ok"] is False  # the python tag on reload was refused, the config kept


def test_metrics_cli_defaults_to_loopback() -> None:
    from layerzero.cli import cli

    params = {p.name: p for p in cli.commands["metrics"].params}
    assert params["addr"].default == "127.0.0.1"
    import inspect

    from layerzero.telemetry.prometheus import start_metrics_server

    assert inspect.signature(start_metrics_server).parameters["addr"].default == "127.0.0.1"


# -- injection through every string a config can carry ------------------------------------------------------------

NAME_PAYLOADS = ["torch_rms_norm; rm -rf /", "$(id)", "`id`", "../../etc/passwd", "/proc/self/mem", "~/.ssh/id_rsa",
                 "C:\\Windows\\system32", "file:///etc/passwd", "torch_rms_norm\x00", "tоrch_rms_norm",  # Cyrillic о
                 "a" * 201, "", "__import__('os')", "rms_norm'--", "{{7*7}}", "${HOME}", "%(x)s", "\n- kernel: x"]


@pytest.mark.parametrize("payload", NAME_PAYLOADS, ids=range(len(NAME_PAYLOADS)))
@pytest.mark.parametrize("where", ["operation", "kernel", "backend", "glob", "chain", "fallback", "lock_map"])
def test_names_with_payloads_are_rejected(where: str, payload: str) -> None:
    doc: dict[str, Any] = {"version": "1.0"}
    if where == "operation":
        doc["dispatch_rules"] = [{"operation": payload, "kernel": "torch_rms_norm"}]
    elif where == "kernel":
        doc["dispatch_rules"] = [{"operation": "rms_norm", "kernel": payload}]
    elif where == "backend":
        doc["kernel_denies"] = [{"operation": "*", "backends": [payload]}]
    elif where == "glob":
        doc["kernel_denies"] = [payload]
    elif where == "chain":
        doc["fallback_chains"] = {"rms_norm": [payload]}
    elif where == "fallback":
        doc["defaults"] = {"fallback_kernel": payload}
    else:
        doc["kernel_locks"] = {payload: "torch_rms_norm"}
    with pytest.raises(ConfigError) as info:
        load_config(doc)
    assert len(info.value.errors) >= 1 and all(isinstance(e, str) for e in info.value.errors)


CONDITION_PAYLOADS = ["__import__('os').system('id')", "().__class__.__bases__[0].__subclasses__()",
                      "open('/etc/passwd').read()", "lambda: 1", "eval('1')", "sm.__class__", "[x for x in ()]",
                      "f'{sm}'", "9**9**9", "sm if True else 0", "sm; import os", "not " * 500 + "is_causal",
                      "(" * 300 + "sm" + ")" * 300, "sm == " + "1" * 5000, "dtype == '" + "a" * 10_000 + "'",
                      "globals()", "__builtins__", "sm >= 80 or __import__", "kernel.__globals__",
                      "operation == 'x' and getattr(sm, 'real')"]


@pytest.mark.parametrize("payload", CONDITION_PAYLOADS, ids=range(len(CONDITION_PAYLOADS)))
def test_condition_payloads_are_rejected(payload: str) -> None:
    with pytest.raises(ConditionError):
        lz.prefer("torch", condition=payload)
    with pytest.raises(PolicyError, match=r"locks\[0\]\.condition: "):
        load_policy({"version": "1.0", "locks": [{"operation": "rms_norm", "kernel": "torch_rms_norm",
                                                  "condition": payload}]})
    with pytest.raises(ConfigError, match=r"dispatch_rules\[0\]\.conditions: "):
        load_config({"version": "1.0", "dispatch_rules": [{"operation": "rms_norm", "kernel": "torch_rms_norm",
                                                           "conditions": payload}]})


BACKTRACKING = ["(a+)+$", "(a*)*$", "(a|a)+$", "(a|aa)*b", "(.*a){12}", "^(\\w+\\s?)*$", "(x+x+)+y",
                "a*a*a*a*a*a*a*b", "(a|a)" * 30 + "$", "([a-z]+)*[0-9]", "(?:a?){30}a{30}", "(a)\\1*"]


@pytest.mark.parametrize("pattern", BACKTRACKING, ids=range(len(BACKTRACKING)))
def test_catastrophic_match_patterns_are_rejected(pattern: str) -> None:
    with pytest.raises(ValueError):
        compile_safe_regex(pattern)
    with pytest.raises(ConfigError, match=r"conditions\.operation_match: "):
        load_config({"version": "1.0", "dispatch_rules": [{"operation": "*", "kernel": "torch_rms_norm",
                                                           "conditions": {"operation_match": pattern}}]})


def finishes(fn: Callable[[], Any], seconds: float = 30.0) -> Any:
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return in ``seconds``."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"did not finish within {seconds}s"
    if errors:
        raise errors[0]
    return out[0] if out else None


def test_accepted_match_patterns_and_globs_stay_bounded_on_long_subjects() -> None:
    """What is accepted is bounded: a pattern within the budget, and fnmatch globs (linear in Python 3.11+),
    against operation names and kernel ids of 10,000 characters."""
    compiled = load_config({"version": "1.0", "dispatch_rules": [
        {"operation": "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b", "kernel": "torch_rms_norm",
         "conditions": {"operation_match": "^(?:a|b).*.*c$", "kernel_match": "[a-z_]*x"}}],
        "kernel_denies": ["*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b"]})
    long_op = "a" * 10_000
    for rule in compiled.policy.rules:
        finishes(lambda rule=rule: rule.matches_operation(long_op))
    rx = compile_safe_regex("^(?:a|b).*.*c$")
    finishes(lambda: [rx.search("a" * 128) for _ in range(100)])
    with lz.configure({"version": "1.0", "denies": [{"operation": "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b",
                                                     "kernels": ["*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b"]}]}):
        with pytest.raises(LayerZeroError):
            finishes(lambda: lz.dispatch.dispatch(long_op, {"x": torch.randn(2, 4)}))


def test_paths_in_config_fields_are_names_not_files(tmp_path: Path) -> None:
    """A path where a name belongs is refused; where free text is allowed it stays text, never opened."""
    secret = tmp_path / "secret.yaml"
    secret.write_text('version: "1.0"\nlocks: [{operation: "*", kernel: torch_sdpa_math}]\n')
    for field in ("operation", "kernel"):
        with pytest.raises(ConfigError, match="contains characters not allowed"):
            load_config({"version": "1.0", "dispatch_rules": [
                {"operation": "rms_norm", "kernel": "torch_rms_norm", field: str(secret)}]})
    policy = load_policy({"version": "1.0", "description": str(secret)})
    assert policy.rules == ()  # the description is text: nothing of secret.yaml came in


def test_config_file_sources_that_are_not_files(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for source, message in ((fifo, "not a regular file"), (tmp_path, "is a directory"),
                            (Path("/proc/self/mem.yaml"), "file not found")):
        with pytest.raises(PolicyError, match=message):
            finishes(lambda source=source: lz.configure(str(source) if source != tmp_path else source))
    big = tmp_path / "big.yaml"
    big.write_text("version: '1.0'\ndescription: '" + "x" * (1 << 20) + "'\n")
    with pytest.raises(PolicyError, match="more than the 1048576 allowed"):
        lz.configure(str(big))


# -- the performance database is untrusted ------------------------------------------------------------------------

def _db_with(path: Path, **row: Any) -> None:
    db = PerfDB(path)
    db.record([Record("hw", "torch=1", "torch_rms_norm", "rms_norm", "float32", "b", 5.0, 0.5, 7)])
    db.close()
    con = sqlite3.connect(path)
    base = {"hardware": "hw", "libraries": "torch=1", "kernel_id": "torch_rms_norm_composed", "operation": "rms_norm",
            "dtype": "float32", "bucket": "b", "median_us": 1.0, "spread_us": 0.1, "samples": 5, "failed": 0,
            "error": None, "source": "tune", "updated": 0.0}
    base.update(row)
    con.execute(f"INSERT INTO measurements ({', '.join(base)}) VALUES ({', '.join('?' * len(base))})",
                tuple(base.values()))
    con.commit()
    con.close()


@pytest.mark.parametrize("row", [
    {"libraries": "x" * 10_000_000}, {"kernel_id": "k" * 10_000_000}, {"source": "s" * 10_000_000},
    {"median_us": 1e300}, {"median_us": float("inf")}, {"spread_us": -1.0}, {"samples": 10**15},
    {"median_us": "fast"}, {"kernel_id": "x'); DROP TABLE measurements; --"}, {"failed": 7}, {"median_us": b"\x00"},
], ids=["10MB-libraries", "10MB-kernel", "10MB-source", "1e300", "inf", "negative", "samples", "text-number",
        "sql-in-id", "failed-7", "blob"])
def test_poisoned_rows_are_skipped_not_trusted(tmp_path: Path, row: dict[str, Any]) -> None:
    path = tmp_path / "perf.db"
    _db_with(path, **row)
    db = PerfDB(path)
    tracemalloc.start()
    found = db.lookup("hw", "rms_norm", "float32", "b")
    rows = db.rows()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert list(found) == ["torch_rms_norm"]  # the honest row stays, the poisoned one is skipped
    assert [r["kernel_id"] for r in rows] == ["torch_rms_norm"]
    assert peak < 2 * 1024 * 1024  # a 10 MB string is cut by SQLite, never loaded into Python
    assert all(len(r["libraries"]) <= MAX_TEXT for r in rows)
    db.close()


def test_lookups_are_parameterized(tmp_path: Path) -> None:
    path = tmp_path / "perf.db"
    _db_with(path)
    db = PerfDB(path)
    for hostile in ("rms_norm' OR '1'='1", "x'; DROP TABLE measurements; --", "%", "*", "rms_norm\x00"):
        assert db.lookup("hw", hostile, "float32", "b") == {}
        assert db.lookup(hostile, "rms_norm", hostile, hostile) == {}
        assert db.rows(operation=hostile) == []
    assert set(db.lookup("hw", "rms_norm", "float32", "b")) == {"torch_rms_norm", "torch_rms_norm_composed"}
    assert db.count() == 2
    db.close()


def test_records_with_hostile_fields_are_refused(tmp_path: Path) -> None:
    db = PerfDB(tmp_path / "perf.db")
    for bad in (Record("hw", "torch=1", "x'); DROP TABLE measurements; --", "rms_norm", "float32", "b", 1.0, 0.1, 3),
                Record("hw", "x" * (MAX_TEXT + 1), "torch_rms_norm", "rms_norm", "float32", "b", 1.0, 0.1, 3),
                Record("hw", "torch=1", "torch_rms_norm", "rms_norm", "float32", "b", 1e13, 0.1, 3),
                Record("hw", "torch=1", "torch_rms_norm", "rms_norm", "float32", "b", 1.0, 0.1, -1)):
        with pytest.raises(lz.errors.PerfDBError, match="cannot store measurement"):
            db.record([bad])
    assert db.count() == 0
    db.close()
