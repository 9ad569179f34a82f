"""The search page's API (`python -m pipeline.search serve`) against the `query` command on the same index:
Flask's test client for most checks, the real command on 127.0.0.1 for the rest (paths sent untouched,
bad uploads, a bounded load)."""
import io
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flask", reason="the [serve] extra (flask) is not installed")

from pipeline.inference.search import SearchIndex, build_text_index  # noqa: E402
from pipeline.inference.search import main as search_cli  # noqa: E402
from pipeline.inference.serve import MAX_UPLOAD, create_app, make_server_for  # noqa: E402
from tests.helpers.serve import multipart  # noqa: E402
from tests.helpers.slurm import report_line  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli_line(capsys, *args) -> str:
    """What `python -m pipeline.search query ARGS` prints for one query (exit status 0 asserted)."""
    capsys.readouterr()
    assert search_cli(["query", *map(str, args)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    return out.rstrip("\n")


@pytest.fixture(scope="module")
def index(serve_index):
    return SearchIndex.open(serve_index)


@pytest.fixture(scope="module")
def client(index):
    return create_app(index).test_client()


@pytest.fixture(scope="module")
def text_index(tiny_runs, test_split, tmp_path_factory):
    """The hashing tiny run's index of the test captions (a text gallery)."""
    folder = tmp_path_factory.mktemp("serve_texts")
    (folder / "captions.txt").write_text("\n".join(c for _, c in test_split[1][:40]) + "\n")
    build_text_index(tiny_runs["hash_64bit"], folder / "captions.txt", folder / "captions.index", progress=False)
    return folder / "captions.index"


def post(client, name: str, data: bytes, k=10):
    return client.post("/api/query", data={"image": (io.BytesIO(data), name), "k": str(k)},
                       content_type="multipart/form-data")


def test_text_queries_answer_what_the_command_prints(client, index, serve_index, serve_gallery, test_split, capsys):
    folder = serve_gallery[0]
    for (_, caption), k in zip(test_split[1][::17], (7, 1, 10, 100)):
        r = client.get("/api/query", query_string={"text": caption, "k": k})
        assert r.status_code == 200 and r.mimetype == "application/json"
        assert r.get_data(as_text=True) == cli_line(capsys, "--index", serve_index, "--text", caption, "-k", k)
        answer = r.get_json()
        assert answer["query"] == caption and len(answer["results"]) == min(k, index.meta["count"])
        positions = [int(p) for p in r.headers["X-Positions"].split(",")]  # what /api/item takes
        assert [str(folder.resolve() / index.items[p]) for p in positions] == [x["path"] for x in answer["results"]]


def test_image_queries_answer_what_the_command_prints(client, serve_index, test_split, capsys, monkeypatch):
    folder = test_split[0]
    monkeypatch.chdir(folder)  # the command's `query` is the path given: here the bare file name, as uploaded
    for name, k in (("000003.png", 5), ("000040.png", 12)):
        r = post(client, name, (folder / name).read_bytes(), k)
        assert r.status_code == 200, r.get_data(as_text=True)
        assert r.get_data(as_text=True) == cli_line(capsys, "--index", serve_index, "--image", name, "-k", k)
        top = r.get_json()["results"][0]  # an image of the gallery finds itself first
        assert Path(top["path"]).name == name and top["score"] == pytest.approx(1.0, abs=1e-5)


def test_a_text_gallery_answers_as_the_command_and_lists_texts(text_index, test_split, capsys, monkeypatch):
    client = create_app(SearchIndex.open(text_index)).test_client()
    caption = test_split[1][3][1]
    r = client.get("/api/query", query_string={"text": caption, "k": 6})
    assert r.get_data(as_text=True) == cli_line(capsys, "--index", text_index, "--text", caption, "-k", 6)
    assert all(isinstance(x["score"], int) for x in r.get_json()["results"])  # Hamming distances
    monkeypatch.chdir(test_split[0])
    r = post(client, "000007.png", (test_split[0] / "000007.png").read_bytes(), 4)
    assert r.get_data(as_text=True) == cli_line(capsys, "--index", text_index, "--image", "000007.png", "-k", 4)
    first = int(r.headers["X-Positions"].split(",")[0])
    item = client.get(f"/api/item/{first}")
    assert item.get_data(as_text=True) == r.get_json()["results"][0]["text"]
    assert 'class="texts"' in client.get("/").get_data(as_text=True)


def test_the_real_server_answers_what_the_command_prints(served, serve_index, test_split, capsys, monkeypatch):
    caption = test_split[1][10][1]
    from urllib.parse import urlencode

    r = served.get("/api/query?" + urlencode({"text": caption, "k": 8}))
    assert r.status == 200
    assert r.body.decode() == cli_line(capsys, "--index", serve_index, "--text", caption, "-k", 8)
    monkeypatch.chdir(test_split[0])
    r = served.post_image("000011.png", (test_split[0] / "000011.png").read_bytes(), 3)
    assert r.status == 200
    assert r.body.decode() == cli_line(capsys, "--index", serve_index, "--image", "000011.png", "-k", 3)


TRAVERSALS = ["/api/item/../secret.txt", "/api/item/../../secret.txt", "/api/item/..%2f..%2fsecret.txt",
              "/api/item/%2e%2e/%2e%2e/secret.txt", "/api/item/%2e%2e%2f%2e%2e%2fsecret.txt",
              "/api/item/%252e%252e%252fsecret.txt", "/api/item/..%5c..%5csecret.txt", "/api/item/0/../../secret.txt",
              "/api/item/%2e%2e%2f%2e%2e%2fphotos.index%2findex.json", "/api/item/-1", "/api/item/64",
              "/api/item/99999999999999999999", "/api/item/0x1", "/api/item/1e1", "/api/item/1%00", "/api/item/%31%00",
              "/%2e%2e/secret.txt", "/page.js/../../secret.txt", "/api/item/1/%2e%2e/%2e%2e/secret.txt"]


def _absolute_paths(secret: Path, serve_index: Path) -> list[str]:
    return [f"/api/item/{secret}", f"/api/item/{secret}".replace("/", "%2f"), f"/api/item/{serve_index}/index.json",
            f"/api/item?path={secret}", f"/api/item/0?path={secret}", f"/api/query?text=x&path={secret}"]


def test_no_request_path_reads_outside_the_index(client, served, index, serve_gallery, serve_index):
    folder, secret = serve_gallery
    forbidden = [secret.read_bytes().strip(), b'"fingerprint"']  # the secret, the index's own index.json
    for path in TRAVERSALS + _absolute_paths(secret, serve_index):
        for status, body in ((lambda r: (r.status_code, r.data))(client.get(path)),
                             (lambda r: (r.status, r.body))(served.get(path))):
            assert not any(f in body for f in forbidden), path
            if "/api/item" in path and "?" not in path:
                assert status != 200, (path, status)
    # what is served: the gallery's own files, by position
    for p in (0, 5, len(index.items) - 1):
        assert client.get(f"/api/item/{p}").data == (folder / index.items[p]).read_bytes()
        assert served.get(f"/api/item/{p}").body == (folder / index.items[p]).read_bytes()


def test_a_gallery_file_replaced_by_a_link_outside_is_refused(client, index, serve_gallery):
    folder, secret = serve_gallery
    victim = folder / index.items[3]
    kept = victim.read_bytes()
    victim.unlink()
    victim.symlink_to(secret)
    try:
        r = client.get("/api/item/3")
        assert r.status_code == 404 and b"SECRET" not in r.data
    finally:
        victim.unlink()
        victim.write_bytes(kept)
    assert client.get("/api/item/3").data == kept


def _bad_uploads(folder: Path) -> list[tuple[str, bytes, object, str]]:
    from PIL import Image

    png = (folder / "000001.png").read_bytes()
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, "PNG")  # 81 megapixels in a few kB
    return [("notes.png", b"just some text\n" * 10, 10, "is not an image"),
            ("bomb.png", bomb.getvalue(), 10, "over 40 megapixels"),
            ("half.png", png[: len(png) // 2], 10, "fails to decode"),
            ("big.png", png + os.urandom(MAX_UPLOAD + 1 - len(png)), 10, "over 10 MiB"),
            ("huge.png", os.urandom(MAX_UPLOAD + 2**20), 10, "over 10 MiB"),
            ("good.png", png, 0, "k must be from 1 to 100"), ("good.png", png, 101, "k must be from 1 to 100"),
            ("good.png", png, "ten", "k must be a whole number")]


def test_bad_uploads_get_400_and_the_server_keeps_serving(client, served, test_split):
    folder = test_split[0]
    for name, data, k, reason in _bad_uploads(folder):
        for status, body in ((lambda r: (r.status_code, r.data))(post(client, name, data, k)),
                             (lambda r: (r.status, r.body))(served.post_image(name, data, k))):
            error = json.loads(body)["error"]
            assert status == 400 and reason in error and "\n" not in error, (name, k, status, error)
        assert client.get("/api/query?text=a+red+circle&k=3").status_code == 200
        assert served.get("/api/query?text=a+red+circle&k=3").status == 200
    body, content_type = multipart({"k": "3"}, {})  # no file at all
    r = client.post("/api/query", data=body, content_type=content_type)
    assert r.status_code == 400 and "no image" in r.get_json()["error"]
    for query in ("/api/query", "/api/query?text=+&k=3", "/api/query?text=x&k=0"):
        assert client.get(query).status_code == 400


def test_the_page_shows_the_model_card_and_loads_nothing_from_elsewhere(client, index, tiny_runs):
    r = client.get("/")
    page = r.get_data(as_text=True)
    metrics = json.loads((tiny_runs["fine_grained"] / "test_metrics.json").read_text())
    assert f"<td>{metrics['t2i_R@1']:.1f}</td>" in page and "cosine similarity" in page
    assert f"<td>{100 * metrics['i2t_mAP@N']:.1f}</td>" in page  # mAP is stored as a fraction, shown in %
    provenance = json.loads((tiny_runs["fine_grained"] / "provenance.json").read_text())
    assert str(provenance["seed"]) in page and provenance["code"]["commit"][:12] in page
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    for asset in ("/page.js", "/page.css", "/"):
        assert "http://" not in client.get(asset).get_data(as_text=True).replace("http://www.w3.org", "")
    assert client.get("/api/info").get_json()["count"] == index.meta["count"]


def test_serve_refuses_an_index_whose_run_changed(tiny_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["fine_grained"], run)
    (tmp_path / "texts.txt").write_text("a red circle\na blue square\n")
    build_text_index(run, tmp_path / "texts.txt", tmp_path / "index", progress=False)
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    name = next(k for k in ckpt["state_dict"] if k.startswith("text_head"))
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 0.01
    torch.save(ckpt, run / "checkpoints" / "best.ckpt")
    capsys.readouterr()
    assert search_cli(["serve", "--index", str(tmp_path / "index"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights differ" in err and "build the index again" in err


def test_another_host_than_loopback_is_said_in_one_line(index, capsys):
    for host, warned in (("127.0.0.1", False), ("127.0.0.2", True)):  # 127.0.0.2: loopback, but not the default
        server = make_server_for(index, host, 0)
        server.server_close()
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == int(warned) and (not warned or "readable by anyone" in err[0])


def load(served, requests: int, threads: int, texts: list[str], image: bytes) -> tuple[list[float], list]:
    """`requests` queries (every tenth an image upload) from `threads` threads: (latencies s, failures)."""
    from urllib.parse import urlencode

    latencies, failures, lock = [], [], threading.Lock()

    def worker(w: int):
        for i in range(w, requests, threads):
            start = time.perf_counter()
            try:
                r = (served.post_image("q.png", image, 10) if i % 10 == 0
                     else served.get("/api/query?" + urlencode({"text": texts[i % len(texts)], "k": 10})))
                ok = r.status == 200 and len(json.loads(r.body)["results"]) == 10
            except Exception as e:  # a refused or reset connection is a failure, counted
                ok, r = False, e
            with lock:
                latencies.append(time.perf_counter() - start)
                if not ok:
                    failures.append(r)

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return latencies, failures


def test_a_few_hundred_queries_from_several_threads(served, test_split, request):
    texts = [c for _, c in test_split[1]]
    start = time.perf_counter()
    latencies, failures = load(served, 200, 8, texts, (test_split[0] / "000002.png").read_bytes())
    wall = time.perf_counter() - start
    assert len(latencies) == 200 and not failures, failures[:3]
    q = statistics.quantiles(latencies, n=100)
    report_line(request, f"\n[serve load] 200 queries, 8 threads: p50 {1000 * q[49]:.1f} ms, "
                         f"p95 {1000 * q[94]:.1f} ms, {200 / wall:.0f} queries/s")
