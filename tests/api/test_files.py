"""OpenAI's files API for fine-tuning, through the `openai` client against the real server:
JSONL kept in the adapter store, refused with an error that names the line when it is not
JSONL, bounded in size, and behind the admin key."""

import json

import httpx
import openai
import pytest

from conftest import admin_headers
from ptmoe_serve.train.files import FileError, TrainingFiles, count_jsonl_lines

EXAMPLES = b"".join(json.dumps({"messages": [
    {"role": "user", "content": f"What is {i} plus {i}?"},
    {"role": "assistant", "content": str(2 * i)}]}).encode() + b"\n" for i in range(20))


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    key = admin_headers()["authorization"].removeprefix("Bearer ")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, timeout=60, max_retries=0)


def test_upload_list_retrieve_download_delete(client):
    uploaded = client.files.create(file=("train.jsonl", EXAMPLES), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(EXAMPLES)
    assert uploaded.filename == "train.jsonl" and uploaded.purpose == "fine-tune"
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).content == EXAMPLES
    two_lines = b"".join(EXAMPLES.splitlines(keepends=True)[:2])
    second = client.files.create(file=("more.jsonl", two_lines), purpose="fine-tune")
    # Newest first, a page at a time (the client follows the cursor).
    listed = [f.id for f in client.files.list(purpose="fine-tune", limit=1)]
    assert listed[:2] == [second.id, uploaded.id]
    assert client.files.list(limit=1).has_more
    assert client.files.delete(second.id).deleted
    with pytest.raises(openai.NotFoundError, match=second.id):
        client.files.retrieve(second.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-../../etc/passwd")
    assert second.id not in [f.id for f in client.files.list()]


@pytest.mark.parametrize("data, purpose, message", [
    (b'{"prompt": "a", "completion": "b"}\nnot json\n', "fine-tune", "line 2 is not JSON"),
    (b'{"prompt": "a"}\n[1, 2]\n', "fine-tune", "line 2 is a JSON list"),
    (b"\n\n", "fine-tune", "holds no lines"),
    # OpenAI's rules on weights, checked at upload.
    (b'{"prompt": "a", "completion": "b"}\n{"messages": [{"role": "user", "content": "a"}, '
     b'{"role": "assistant", "content": "b", "weight": 2}]}\n', "fine-tune",
     "line 2, message 1: weight must be 0 or 1; got 2"),
    (b'{"messages": [{"role": "system", "content": "s", "weight": 0}, {"role": "user", '
     b'"content": "a"}, {"role": "assistant", "content": "b"}]}\n', "fine-tune",
     "line 1, message 0: weight is taken on assistant messages only"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", '
     b'"weight": 0}]}\n', "fine-tune", "line 1, every assistant message has weight 0"),
    (b"\xff\xfe", "fine-tune", "not UTF-8"),
    (EXAMPLES, "assistants", "purpose 'assistants'"),
])
def test_a_file_that_is_not_jsonl_for_fine_tuning_is_refused_naming_the_problem(
        client, data, purpose, message):
    before = [f.id for f in client.files.list()]
    with pytest.raises(openai.BadRequestError, match=message):
        client.files.create(file=("bad.jsonl", data), purpose=purpose)
    assert [f.id for f in client.files.list()] == before


def test_uploads_are_bounded_and_need_the_admin_key(server):
    # Over --max-upload-mb (64): refused from its Content-Length, before the body is read.
    response = httpx.post(f"{server.url}/v1/files", headers={
        **admin_headers(), "content-type": "multipart/form-data; boundary=x"},
        content=b"x" * (64 * 1024 * 1024 + 1), timeout=60)
    assert response.status_code == 413 and "--max-upload-mb" in response.text
    for headers in ({}, {"authorization": "Bearer not-the-key"}):
        response = httpx.post(f"{server.url}/v1/files", headers=headers,
                              files={"file": ("t.jsonl", EXAMPLES)}, data={"purpose": "fine-tune"})
        assert response.status_code == 401, response.text
        assert httpx.get(f"{server.url}/v1/files", headers=headers).status_code == 401


def test_files_live_in_the_store_for_every_server_over_it(tmp_path):
    first, second = TrainingFiles(tmp_path), TrainingFiles(tmp_path)
    record = first.add("../../x/train.jsonl", "fine-tune", EXAMPLES)
    assert record.filename == "train.jsonl" and record.lines == 20
    assert second.get(record.id) == record and second.page(None, 10) == ([record], False)
    assert second.content_path(record.id).read_bytes() == EXAMPLES
    second.delete(record.id)
    assert first.page(None, 10) == ([], False)
    with pytest.raises(FileError, match="line 1"):
        count_jsonl_lines(b"[" * 100_000)  # nested past the parser's depth
