"""ApiError: every refusal the server makes, raised anywhere in a handler and answered as an OpenAI-shaped error
body with its HTTP status (and headers such as Retry-After)."""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse

from kubellm.runtime.server import protocol as p


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers

    def response(self) -> JSONResponse:
        body = p.ErrorResponse(
            error=p.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.status)
        )
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
