"""Settings of a small Django site that sends its mail through Postroom.

The test points it at a Postroom instance through the environment: TEST_POSTROOM_CONFIG
(embedded mode) or TEST_POSTROOM_URL + TEST_POSTROOM_API_KEY (remote mode)."""

from __future__ import annotations

import os

SECRET_KEY = "test-only-not-secret"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["shopsite"]
DATABASES: dict[str, dict[str, str]] = {}
DEFAULT_FROM_EMAIL = "Shöp <shop@example.org>"

EMAIL_BACKEND = "postroom.django.EmailBackend"
if os.environ.get("TEST_POSTROOM_URL"):
    POSTROOM = {"url": os.environ["TEST_POSTROOM_URL"],
                "api_key": os.environ["TEST_POSTROOM_API_KEY"], "tags": ["django"]}
else:
    POSTROOM = {"config": os.environ["TEST_POSTROOM_CONFIG"], "app": "djangoshop",
                "tags": ["django"]}
