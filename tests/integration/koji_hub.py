"""A Koji stand-in: an XML-RPC hub and a file server in Koji's layout, on 127.0.0.1.

The real ``koji.ClientSession`` talks to it: keyword arguments arrive as koji
encodes them (a last dict marked ``__starstar``), ``multiCall`` answers a list of
one-element lists or fault dicts, and errors are XML-RPC faults with koji's
fault codes, as the real hub raises them.  Files are served under
``/kojifiles/[vol/<volume>/]packages/<name>/<version>/<release>/<arch>/<file>``
(``koji.PathInfo``) and ``.../data/signed/<key>/<arch>/<file>``.

Tests steer it: :attr:`KojiStandIn.down` answers 503 to everything (Koji failing),
:attr:`KojiStandIn.corrupt` flips one payload byte of the named files for a given
number of downloads, :attr:`KojiStandIn.html` answers an HTML error page with 200
instead of them, :attr:`KojiStandIn.truncate` sends half of them and closes the
connection, :attr:`KojiStandIn.malformed` leaves Koji's payload hash out of the
named builds' RPM records, :attr:`KojiStandIn.slow` makes every hub call wait that
many seconds before it answers.
"""

# The hub's methods and arguments are named as Koji names them: that is the protocol.
# ruff: noqa: N802, N803

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import xmlrpc.client
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

GENERIC_ERROR = 1000  # koji.GenericError.faultCode
PARAMETER_ERROR = 1019  # koji.ParameterError.faultCode


class Fault(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def rpm_query(path: Path, fmt: str) -> str:
    return subprocess.run(
        ["rpm", "-qp", "--nosignature", "--nodigest", "--qf", fmt, str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


@dataclass
class Build:
    id: int
    name: str
    version: str
    release: str
    state: int = 1
    owner: str = "packager"
    volume: str = "DEFAULT"
    types: dict[str, Any] = field(default_factory=lambda: {"rpm": None})
    completion_ts: float = field(default_factory=time.time)
    tags: list[str] = field(default_factory=list)
    rpms: list[dict[str, Any]] = field(default_factory=list)

    @property
    def nvr(self) -> str:
        return f"{self.name}-{self.version}-{self.release}"

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "build_id": self.id,
            "name": self.name,
            "package_name": self.name,
            "version": self.version,
            "release": self.release,
            "epoch": None,
            "nvr": self.nvr,
            "state": self.state,
            "owner_name": self.owner,
            "task_id": self.id * 10,
            "volume_name": self.volume,
            "volume_id": 0 if self.volume == "DEFAULT" else 1,
            "completion_ts": self.completion_ts,
            "completion_time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.completion_ts)),
            "extra": None,
            "source": None,
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client closing a kept-alive connection, or a test killing a download, is normal.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class KojiStandIn:
    """The hub and file server; :meth:`add_build` publishes RPM files in Koji's layout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = root / "kojifiles"
        self.files.mkdir(parents=True, exist_ok=True)
        self.builds: dict[int, Build] = {}
        self.down = False
        self.slow = 0.0  # seconds each hub call waits before answering (a Koji under load)
        self.corrupt: dict[str, int] = {}  # file name -> downloads still to corrupt
        self.html: dict[str, int] = {}  # file name -> downloads to answer with an error page
        self.truncate: dict[str, int] = {}  # file name -> downloads to cut off halfway
        self.malformed: set[int] = set()  # builds whose RPM records lack the payload hash
        self.calls: list[str] = []
        self.downloads: list[str] = []
        self.paths: list[str] = []
        self.refused = 0  # requests answered 503 while down
        self.stall: dict[str, int] = {}  # file name -> downloads to cut off halfway
        self.stalled = threading.Event()  # set when a download is hanging halfway
        self.release_stalls = threading.Event()
        self._next_rpm_id = 1000
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- life -----------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def hub_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/kojihub"

    @property
    def top_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/kojifiles"

    def start(self) -> KojiStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- content --------------------------------------------------------------

    def add_build(
        self,
        build_id: int,
        rpms: list[Path],
        *,
        state: int = 1,
        volume: str = "DEFAULT",
        types: dict[str, Any] | None = None,
        sigkeys: tuple[str, ...] = (),
        tags: tuple[str, ...] = (),
        signed: dict[str, list[Path]] | None = None,
    ) -> Build:
        """A build of the given RPM files (all from one source RPM), served in Koji's layout.

        ``sigkeys`` serve the unsigned files as signed copies; ``signed`` maps a key to
        really signed copies of (some of) the files.
        """
        signed = signed or {}
        if rpms:
            name, version, release = rpm_query(
                rpms[0], "%{SOURCERPM}\\n%{VERSION}\\n%{RELEASE}"
            ).split("\n")
            name = name.rsplit("-", 2)[0]
        else:
            name, version, release = f"image-{build_id}", "1", "1"
        build = Build(build_id, name, version, release, state, volume=volume, tags=list(tags))
        if types is not None:
            build.types = types
        base = self.files / ("" if volume == "DEFAULT" else f"vol/{volume}")
        build_dir = base / "packages" / name / version / release
        for path in rpms:
            fields = rpm_query(
                path, "%{NAME}\\n%{VERSION}\\n%{RELEASE}\\n%{EPOCHNUM}\\n%{ARCH}\\n%{SIGMD5}"
            ).split("\n")
            rpm_name, rpm_version, rpm_release, epoch, arch, sigmd5 = fields
            target = build_dir / arch / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            keys = list(sigkeys)
            for key in sigkeys:
                copy = build_dir / "data" / "signed" / key / arch / path.name
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, copy)
            for key, files in signed.items():
                for signed_file in files:
                    if signed_file.name == path.name:
                        copy = build_dir / "data" / "signed" / key / arch / path.name
                        copy.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(signed_file, copy)
                        keys.append(key)
            self._next_rpm_id += 1
            build.rpms.append(
                {
                    "id": self._next_rpm_id,
                    "build_id": build_id,
                    "name": rpm_name,
                    "version": rpm_version,
                    "release": rpm_release,
                    "epoch": None if epoch == "0" else int(epoch),
                    "arch": arch,
                    "size": path.stat().st_size,
                    "payloadhash": sigmd5,
                    "buildroot_id": 1,
                    "external_repo_id": 0,
                    "external_repo_name": "INTERNAL",
                    "metadata_only": False,
                    "extra": None,
                    "sigkeys": keys,
                }
            )
        with self._lock:
            self.builds[build_id] = build
        return build

    # -- the hub's methods ----------------------------------------------------

    def _find(self, info: Any, strict: bool = False) -> Build | None:
        found: Build | None = None
        if isinstance(info, int):
            found = self.builds.get(info)
        elif isinstance(info, str):
            found = next((b for b in self.builds.values() if b.nvr == info), None)
        elif isinstance(info, dict) and "id" in info:
            found = self.builds.get(int(info["id"]))
        else:
            raise Fault(PARAMETER_ERROR, f"Invalid type for buildInfo: {type(info)}")
        if found is None and strict:
            raise Fault(GENERIC_ERROR, f"No such build: {info!r}")
        return found

    def getAPIVersion(self) -> int:
        return 1

    def getBuild(self, buildInfo: Any, strict: bool = False) -> dict[str, Any] | None:
        build = self._find(buildInfo, strict)
        return None if build is None else build.info()

    def getBuildType(self, buildInfo: Any, strict: bool = False) -> dict[str, Any]:
        build = self._find(buildInfo, strict)
        return {} if build is None else dict(build.types)

    def listRPMs(
        self, buildID: int | None = None, arches: Any = None, **_: Any
    ) -> list[dict[str, Any]]:
        if buildID is None:
            raise Fault(PARAMETER_ERROR, "listRPMs needs buildID here")
        build = self.builds.get(buildID)
        rpms = [] if build is None else build.rpms
        wanted = [arches] if isinstance(arches, str) else arches
        left_out = {"sigkeys", "payloadhash"} if buildID in self.malformed else {"sigkeys"}
        return [
            {k: v for k, v in r.items() if k not in left_out}
            for r in rpms
            if not wanted or r["arch"] in wanted
        ]

    def queryRPMSigs(
        self, rpm_id: int | None = None, sigkey: str | None = None, **_: Any
    ) -> list[dict[str, Any]]:
        for build in self.builds.values():
            for r in build.rpms:
                if r["id"] == rpm_id:
                    return [
                        {"rpm_id": rpm_id, "sigkey": k, "sighash": "0" * 32}
                        for k in r["sigkeys"]
                        if sigkey is None or k == sigkey
                    ]
        return []

    def listBuilds(
        self, state: int | None = None, completeAfter: float | None = None, **_: Any
    ) -> list[dict[str, Any]]:
        return [
            b.info()
            for b in sorted(self.builds.values(), key=lambda b: b.id)
            if (state is None or b.state == state)
            and (completeAfter is None or b.completion_ts > completeAfter)
        ]

    def listTagged(self, tag: str, inherit: bool = False, **_: Any) -> list[dict[str, Any]]:
        del inherit
        return [{**b.info(), "tag_name": tag} for b in self.builds.values() if tag in b.tags]

    def listTags(self, build: Any = None, **_: Any) -> list[dict[str, Any]]:
        found = self._find(build, strict=True)
        assert found is not None
        return [{"id": i, "name": t} for i, t in enumerate(found.tags)]

    def multiCall(self, calls: list[dict[str, Any]], strict: bool = False) -> list[Any]:
        answers: list[Any] = []
        for call in calls:
            try:
                answers.append([self.dispatch(call["methodName"], call["params"])])
            except Fault as fault:
                if strict:
                    raise
                answers.append({"faultCode": fault.code, "faultString": fault.text})
        return answers

    def dispatch(self, method: str, params: tuple[Any, ...] | list[Any]) -> Any:
        args = list(params)
        kwargs: dict[str, Any] = {}
        if args and isinstance(args[-1], dict) and args[-1].get("__starstar"):
            kwargs = {k: v for k, v in args.pop().items() if k != "__starstar"}
        if method.startswith("_") or method not in HUB_METHODS:
            raise Fault(GENERIC_ERROR, f"Invalid method: {method}")
        self.calls.append(method)
        try:
            return getattr(self, method)(*args, **kwargs)
        except TypeError as exc:
            raise Fault(PARAMETER_ERROR, f"Invalid parameters for {method}: {exc}") from exc


HUB_METHODS = {
    "getAPIVersion",
    "getBuild",
    "getBuildType",
    "listRPMs",
    "queryRPMSigs",
    "listBuilds",
    "listTagged",
    "listTags",
    "multiCall",
}


def _handler_for(koji: KojiStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            del format, args

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            request = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if koji.down or self.path.rstrip("/") != "/kojihub":
                koji.refused += 1
                self._answer(503, b"Service Unavailable", "text/plain")
                return
            if koji.slow:
                time.sleep(koji.slow)
            params, method = xmlrpc.client.loads(request, use_builtin_types=True)
            try:
                result = koji.dispatch(method or "", params)
                body = xmlrpc.client.dumps((result,), methodresponse=True, allow_none=True)
            except Fault as fault:
                body = xmlrpc.client.dumps(xmlrpc.client.Fault(fault.code, fault.text))
            self._answer(200, body.encode(), "text/xml")

        def do_GET(self) -> None:
            if koji.down:
                koji.refused += 1
                self._answer(503, b"Service Unavailable", "text/plain")
                return
            relative = self.path.split("?")[0].removeprefix("/kojifiles/")
            path = (koji.files / relative).resolve()
            if not path.is_relative_to(koji.files.resolve()) or not path.is_file():
                self._answer(404, b"Not Found", "text/plain")
                return
            data = path.read_bytes()
            with koji._lock:
                stall = koji.stall.get(path.name, 0)
                if stall:
                    koji.stall[path.name] = stall - 1
            if stall:
                # Half the file, then nothing: a download a test interrupts.
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                koji.stalled.set()
                koji.release_stalls.wait(60)
                self.close_connection = True
                return
            with koji._lock:
                html = koji.html.get(path.name, 0)
                if html:
                    koji.html[path.name] = html - 1
                cut = koji.truncate.get(path.name, 0)
                if cut:
                    koji.truncate[path.name] = cut - 1
            if html:
                # What a proxy in front of a file server may answer, with 200.
                page = b"<!DOCTYPE html>\n<html><head><title>Error</title></head><body>"
                page += b"<h1>Temporarily unavailable</h1><p>Please try again later.</p>"
                self._answer(200, page + b" " * 200 + b"</body></html>\n", "text/html")
                return
            if cut:
                # Half the file, and the connection closed: fewer bytes than announced.
                self.send_response(200)
                self.send_header("Content-Type", "application/x-rpm")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            koji.downloads.append(path.name)
            koji.paths.append(self.path)
            with koji._lock:
                left = koji.corrupt.get(path.name, 0)
                if left:
                    koji.corrupt[path.name] = left - 1
                    flipped = bytearray(data)
                    flipped[-100] ^= 0x01  # inside the compressed payload
                    data = bytes(flipped)
            self._answer(200, data, "application/x-rpm")

    return Handler


def build_rpms(
    out: Path,
    name: str,
    count: int,
    size_kib: int = 64,
    arch: str = "noarch",
    release: str = "1",
    dist: str = ".fc40",
) -> list[Path]:
    """``count`` real RPMs of one source package (``name`` plus subpackages), by rpmbuild.

    Each carries one file of random bytes of ``size_kib`` KiB; ``arch`` is
    ``noarch`` or this machine's architecture.
    """
    top = out / f"rpmbuild-{name}"
    spec = top / f"{name}.spec"
    spec.parent.mkdir(parents=True, exist_ok=True)
    subpackages = "".join(
        f"%package part{i}\nSummary: part {i}\n%description part{i}\npart {i}\n"
        f"%files part{i}\n/usr/share/{name}/part{i}.bin\n"
        for i in range(1, count)
    )
    build_arch = "BuildArch: noarch\n" if arch == "noarch" else ""
    spec.write_text(
        f"Name: {name}\nVersion: 1.0\nRelease: {release}%{{?dist}}\nSummary: test build\n"
        f"License: MIT\n{build_arch}\n%description\nA build for the mirror's tests.\n"
        f"%global debug_package %{{nil}}\n"
        f"%install\nmkdir -p %{{buildroot}}/usr/share/{name}\n"
        f"for i in $(seq 0 {count - 1}); do head -c {size_kib * 1024} /dev/urandom"
        f" > %{{buildroot}}/usr/share/{name}/part$i.bin; done\n"
        f"%files\n/usr/share/{name}/part0.bin\n{subpackages}"
    )
    subprocess.run(
        [
            "rpmbuild",
            "-bb",
            "--nodeps",
            "--define",
            f"_topdir {top}",
            "--define",
            f"dist {dist}",
            "--define",
            "_binary_payload w1.gzdio",
            str(spec),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return sorted((top / "RPMS").glob("*/*.rpm"))
