"""The one exception type the transport turns into the API's error shapes (HTTP body or WebSocket event)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ApiError(Exception):
    status: int
    error_code: str | None
    title: str
    message: str
    headers: dict[str, str] | None = None

    def __str__(self) -> str:
        return f"{self.title}: {self.message}"


def bad_request(
    message: str, error_code: str = "invalid_request", title: str = "Invalid request"
) -> ApiError:
    return ApiError(400, error_code, title, message)


def model_not_found(model: str, available: list[str]) -> ApiError:
    return ApiError(
        400,
        "model_not_found",
        "Invalid model",
        f"model {model!r} is not available; choose one of: {', '.join(available)}",
    )


def unauthorized(message: str = "a valid API key or access token is required") -> ApiError:
    return ApiError(401, "unauthorized", "Unauthorized", message)


def overloaded(message: str = "the server is at capacity; retry shortly") -> ApiError:
    return ApiError(429, "concurrency_limited", "Too many concurrent requests", message)
