"""OpenAI's Files API, driven by the official `openai` package: upload, list, retrieve, download, delete."""

import json
import uuid
from collections.abc import Iterator

import openai
import pytest

from tests.extra_api import extra_api

LINES = [
    {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": f"Count to {i}."}]}}
    for i in range(3)
]
JSONL = "\n".join(json.dumps(line) for line in LINES).encode() + b"\n"


@pytest.fixture
def sdk(api_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_a_file_round_trip(sdk: openai.OpenAI) -> None:
    created = sdk.files.create(file=("lines.jsonl", JSONL), purpose="batch")
    assert created.id.startswith("file-") and created.bytes == len(JSONL) and created.filename == "lines.jsonl"
    assert created.purpose == "batch" and created.status == "processed"
    assert sdk.files.retrieve(created.id) == created
    assert sdk.files.content(created.id).content == JSONL
    assert created.id in [f.id for f in sdk.files.list(purpose="batch")]
    deleted = sdk.files.delete(created.id)
    assert deleted.id == created.id and deleted.deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.files.content(created.id)
    assert created.id not in [f.id for f in sdk.files.list()]


def test_the_list_pages_newest_first(sdk: openai.OpenAI) -> None:
    ids = [sdk.files.create(file=(f"{i}.jsonl", JSONL), purpose="batch").id for i in range(3)]
    try:
        first = sdk.files.list(limit=2)
        assert [f.id for f in first.data] == ids[::-1][:2] and first.has_more
        assert [f.id for f in sdk.files.list(limit=2, order="asc", after=ids[0]).data][:2] == ids[1:]
        walked = [f.id for f in sdk.files.list(limit=1)]  # the SDK follows `after` from page to page
        assert walked[:3] == ids[::-1]
    finally:
        for file_id in ids:
            sdk.files.delete(file_id)


def test_a_purpose_other_than_batch_is_refused_by_name(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.files.create(file=("a.jsonl", JSONL), purpose="fine-tune")
    assert refused.value.param == "purpose"


def test_sizes_answer_413_and_keys_see_only_their_own_files(
    api_url: str, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    key_a, key_b = (f"files-{uuid.uuid4().hex}" for _ in range(2))  # budgets fresh, whatever ran before
    overrides = {"API_KEYS": f"a:{key_a},b:{key_b}", "FILE_MAX_BYTES": "4096", "FILES_BYTES_PER_KEY": "8192"}
    with extra_api(stack_env, tmp_path_factory.mktemp("files"), overrides) as url:
        a = openai.OpenAI(base_url=f"{url}/v1", api_key=key_a, max_retries=0)
        b = openai.OpenAI(base_url=f"{url}/v1", api_key=key_b, max_retries=0)
        with pytest.raises(openai.APIStatusError) as too_large:
            a.files.create(file=("big.jsonl", b"x" * 5000), purpose="batch")
        assert too_large.value.status_code == 413 and "FILE_MAX_BYTES" in too_large.value.message
        with pytest.raises(openai.APIStatusError) as over_body:
            a.files.create(file=("huge.jsonl", b"x" * 200_000), purpose="batch")
        assert over_body.value.status_code == 413
        kept = [a.files.create(file=(f"{i}.jsonl", b"y" * 4000), purpose="batch") for i in range(2)]
        with pytest.raises(openai.APIStatusError) as over_budget:
            a.files.create(file=("more.jsonl", b"z" * 1000), purpose="batch")
        assert over_budget.value.status_code == 413 and "FILES_BYTES_PER_KEY" in over_budget.value.message
        with pytest.raises(openai.NotFoundError):
            b.files.retrieve(kept[0].id)
        with pytest.raises(openai.NotFoundError):
            b.files.delete(kept[0].id)
        assert b.files.list().data == []
        a.files.delete(kept[0].id)
        assert a.files.create(file=("fits.jsonl", b"z" * 1000), purpose="batch").bytes == 1000
