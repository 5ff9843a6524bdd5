"""The service commands' one-line errors that need no running server: unreachable servers, odd answers, openapi."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from service.cli import main
from service.cli_service import openapi_document
from tests.helpers import free_port
from tests.test_jobs import SPEC


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.removeprefix("splan: error: ").rstrip("\n")


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


class _GatewayPage(BaseHTTPRequestHandler):
    """What a proxy in front of a stopped API answers: 502 with an HTML page."""

    def do_GET(self) -> None:
        self._page()

    def do_POST(self) -> None:
        self._page()

    def _page(self) -> None:
        body = b"<html><body>  Bad gateway  </body></html>\n"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GatewayPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_an_unreachable_server_is_one_line(spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    assert _error(["submit", str(spec_file), "--server", server], capsys).startswith(f"cannot reach {server}: ")


def test_an_answer_that_is_not_json_is_quoted(
    spec_file: Path, gateway: str, capsys: pytest.CaptureFixture[str]
) -> None:
    message = "server answered 502: <html><body>  Bad gateway  </body></html>"
    assert _error(["submit", str(spec_file), "--server", gateway], capsys) == message
    assert _error(["status", "some-id", "--server", gateway], capsys) == message


def test_a_cluster_file_is_not_sent_to_a_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "fleet.yaml"
    spec.write_text(yaml.safe_dump({"kind": "fleet", "cluster_file": "cluster.yaml", "deployments": []}))
    message = _error(["submit", str(spec), "--server", f"http://127.0.0.1:{free_port()}"], capsys)
    assert message.startswith("cluster_file is read by `splan plan` only; store the cluster with PUT /v1/clusters/")


def test_openapi_writes_the_document_and_checks_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "docs" / "openapi.json"
    assert _error(["openapi", "--check", "--out", str(out)], capsys) == f"{out} is out of date; run `splan openapi`"
    assert main(["openapi", "--out", str(out)]) == 0
    assert capsys.readouterr().err == f"splan: wrote {out}\n"
    assert out.read_text(encoding="utf-8") == openapi_document()
    assert json.loads(out.read_text(encoding="utf-8"))["paths"]
    assert main(["openapi", "--check", "--out", str(out)]) == 0
    out.write_text(out.read_text(encoding="utf-8").replace('"title"', '"Title"', 1), encoding="utf-8")
    assert _error(["openapi", "--check", "--out", str(out)], capsys) == f"{out} is out of date; run `splan openapi`"
