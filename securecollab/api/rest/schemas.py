"""Models shared by several REST routes (for validation and the OpenAPI document)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every 4xx/5xx body."""

    error: str = Field(description="machine-readable code, e.g. invalid_token")
    detail: str = Field(description="human-readable explanation")
    requestId: str | None = Field(default=None, description="on 500 only: quote it to the operator")
