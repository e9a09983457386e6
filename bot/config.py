"""Settings from the environment and `.env`, read once at start into one typed object.

Every knob a server admin can turn is here, named exactly as the README and design promise.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated


class Settings(BaseSettings):
    # Inputs stay out of validation errors: they hold tokens, keys and DATABASE_URL's password, and an error
    # raised outside the CLI (which prints only where and why) would otherwise put them in a traceback or log.
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True,
                                      hide_input_in_errors=True)

    openai_api_key: str | None = Field(None, validation_alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(None, validation_alias="OPENAI_BASE_URL")
    openai_model: str = Field("gpt-4o-mini", validation_alias="PERSONABOT_OPENAI_MODEL")
    backend_choice: Literal["openai", "local"] | None = Field(None, validation_alias="PERSONABOT_BACKEND")
    local_model: str = Field("smollm2", validation_alias="PERSONABOT_LOCAL_MODEL")
    embed_model: str | None = Field(None, validation_alias="PERSONABOT_EMBED_MODEL")
    # a sentence-transformers CrossEncoder (model dir or hub id) that re-reads the top passages of each search
    rerank_model: str | None = Field(None, validation_alias="PERSONABOT_RERANK_MODEL")
    data_dir: Path = Field(Path("data"), validation_alias="PERSONABOT_DATA_DIR")
    # postgresql://user:password@host:port/db: history and every other table in PostgreSQL instead of the SQLite
    # file in data_dir, so several processes (`personabot run` on several machines) share one store.
    database_url: str | None = Field(None, validation_alias="DATABASE_URL")
    personas_dir: Path = Field(Path("personas"), validation_alias="PERSONABOT_PERSONAS_DIR")
    knowledge_dir: Path = Field(Path("knowledge"), validation_alias="PERSONABOT_KNOWLEDGE_DIR")
    knowledge_max_upload_mb: float = Field(10.0, gt=0, validation_alias="PERSONABOT_KNOWLEDGE_MAX_UPLOAD_MB")
    default_persona: str = Field("assistant", validation_alias="PERSONABOT_DEFAULT_PERSONA")
    admins: Annotated[frozenset[str], NoDecode] = Field(frozenset(), validation_alias="PERSONABOT_ADMINS")
    daily_token_budget: int | None = Field(None, validation_alias="PERSONABOT_DAILY_TOKEN_BUDGET")
    max_context_tokens: int = Field(32_000, validation_alias="PERSONABOT_MAX_CONTEXT_TOKENS")
    model_timeout: float = Field(60.0, validation_alias="PERSONABOT_MODEL_TIMEOUT")
    max_reply_tokens: int = Field(1024, gt=0, validation_alias="PERSONABOT_MAX_REPLY_TOKENS")
    # Model names and local model paths a workspace admin may give a persona; empty = the configured defaults.
    allowed_models: Annotated[frozenset[str], NoDecode] = Field(frozenset(), validation_alias="PERSONABOT_ALLOWED_MODELS")
    max_local_models: int = Field(2, gt=0, validation_alias="PERSONABOT_MAX_LOCAL_MODELS")
    # Images and files in chat (bot/attachments.py): OpenAI-backend models that see images besides OpenAI's own
    # vision models, and what one message may bring.
    vision_models: Annotated[frozenset[str], NoDecode] = Field(frozenset(), validation_alias="PERSONABOT_VISION_MODELS")
    max_attachments: int = Field(4, ge=0, validation_alias="PERSONABOT_MAX_ATTACHMENTS")
    max_image_mb: float = Field(5.0, gt=0, validation_alias="PERSONABOT_MAX_IMAGE_MB")
    max_text_file_kb: float = Field(32.0, gt=0, validation_alias="PERSONABOT_MAX_TEXT_FILE_KB")
    # Which engine serves local models: CTranslate2 wherever it converts the model ("auto"), or one forced.
    local_engine: Literal["auto", "ctranslate2", "transformers"] = Field(
        "auto", validation_alias="PERSONABOT_LOCAL_ENGINE")
    log_level: str = Field("WARNING", validation_alias="PERSONABOT_LOG_LEVEL")

    discord_token: str | None = Field(None, validation_alias="DISCORD_TOKEN")
    # Sharding (Discord requires it past 2,500 servers): the total count over every process, and the shards this
    # process runs. Unset: discord.py asks Discord for its recommended count and runs every shard here.
    discord_shard_count: int | None = Field(None, gt=0, validation_alias="DISCORD_SHARD_COUNT")
    discord_shard_ids: Annotated[tuple[int, ...] | None, NoDecode] = Field(None, validation_alias="DISCORD_SHARD_IDS")
    slack_bot_token: str | None = Field(None, validation_alias="SLACK_BOT_TOKEN")
    slack_signing_secret: str | None = Field(None, validation_alias="SLACK_SIGNING_SECRET")
    slack_app_token: str | None = Field(None, validation_alias="SLACK_APP_TOKEN")
    slack_api_url: str | None = Field(None, validation_alias="SLACK_API_URL")
    # Both set: Slack's OAuth install (GET /slack/install) serves any number of workspaces, each with its own token.
    slack_client_id: str | None = Field(None, validation_alias="SLACK_CLIENT_ID")
    slack_client_secret: str | None = Field(None, validation_alias="SLACK_CLIENT_SECRET")
    port: int = Field(8000, validation_alias=AliasChoices("PORT"))
    bind_address: str = Field("0.0.0.0", validation_alias="PERSONABOT_BIND_ADDRESS")
    # When set, GET /metrics answers only requests with `Authorization: Bearer <token>`.
    metrics_token: str | None = Field(None, validation_alias="PERSONABOT_METRICS_TOKEN")
    # The https address $PORT is reachable at, so Discord and Slack can fetch persona avatar files from it.
    public_url: str | None = Field(None, validation_alias="PERSONABOT_PUBLIC_URL")

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("DATABASE_URL must be a postgresql:// URL (SQLite needs none: it lives in the data dir)")
        return value or None

    @field_validator("admins", "allowed_models", "vision_models", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(part.strip() for part in value.replace(";", ",").split(",") if part.strip())
        return value

    @field_validator("discord_shard_count", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("discord_shard_ids", mode="before")
    @classmethod
    def _split_shard_ids(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        parts = [part.strip() for part in value.split(",") if part.strip()]
        if not all(part.isdigit() for part in parts):
            raise ValueError(f"DISCORD_SHARD_IDS must be shard numbers separated by commas (e.g. 0,1,2), not {value!r}")
        return tuple(int(part) for part in parts) or None

    @model_validator(mode="after")
    def _check_shards(self) -> "Settings":
        ids, count = self.discord_shard_ids, self.discord_shard_count
        if ids is None:
            return self
        if count is None:
            raise ValueError("DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT, the total number of shards over every process")
        if len(set(ids)) != len(ids):
            raise ValueError(f"DISCORD_SHARD_IDS lists a shard twice: {','.join(map(str, ids))}")
        if too_big := sorted(i for i in ids if i >= count):
            raise ValueError(f"DISCORD_SHARD_IDS {','.join(map(str, too_big))}: shard ids run from 0 to "
                             f"DISCORD_SHARD_COUNT - 1 = {count - 1}")
        return self

    @property
    def backend(self) -> Literal["openai", "local"]:
        if self.backend_choice:
            return self.backend_choice
        return "openai" if self.openai_api_key else "local"

    @property
    def model_allow_list(self) -> frozenset[str]:
        """What a workspace admin may pick: PERSONABOT_ALLOWED_MODELS, else only the configured defaults."""
        return self.allowed_models or frozenset({self.openai_model, self.local_model})

    @cached_property
    def db_path(self) -> Path:
        return self.data_dir / "personabot.sqlite3"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"
