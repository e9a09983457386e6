# The two commands a fresh machine needs: `make chat` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/personabot: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes its CPU build instead of
	# PyPI's multi-GB CUDA one (the Dockerfile does that; this project's machines have the CPU build on disk).
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

.PHONY: install chat test
install: $(BIN)/personabot

chat: install
	$(BIN)/personabot chat

# The tests that drive the bot whole (platforms, commands, engine), run a second time on PostgreSQL, so
# neither store can fall behind; the store-level tests already run on both. Skipped where PostgreSQL is missing.
ON_BOTH_STORES := tests/test_slack.py tests/test_slack_workspaces.py tests/test_slack_hardening.py \
	tests/test_discord.py tests/test_discord_workspaces.py tests/test_commands_everywhere.py tests/test_images_in.py \
	tests/test_persona_identity.py tests/test_terminal.py tests/test_workspaces.py tests/test_engine.py \
	tests/test_knowledge_engine.py tests/test_crash.py

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q
	PERSONABOT_TEST_STORE=postgres HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q $(ON_BOTH_STORES)
