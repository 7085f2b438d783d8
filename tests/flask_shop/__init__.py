"""A small Flask shop that sends its mail through Postroom (postroom.flask), built by an app
factory as Flask recommends: the extension object is made once, each app binds it in
create_app(). tests/test_flask.py drives it with Flask's test client."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from postroom.exceptions import PostroomError
from postroom.flask import Postroom

postroom = Postroom()


def create_app(config: Mapping[str, Any]) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    postroom.init_app(app)

    @app.post("/signup")
    def signup() -> ResponseReturnValue:
        form = request.form
        try:
            msg_id = postroom.send(
                to=form["email"], subject=form["subject"], text="Welcome, Grüße!",
                html="<p>Welcome, <b>Grüße</b>!</p>", cc=form.getlist("cc"),
                bcc=form.getlist("bcc"), reply_to="help@example.org",
                attachments=[("terms.txt", "Terms: café ☕\n".encode(), "text/plain")],
                tags="signup")
        except PostroomError as err:
            return jsonify(error=err.code, message=err.message), 422
        return jsonify(id=msg_id), 202

    @app.post("/async-signup")
    async def async_signup() -> ResponseReturnValue:
        msg_id = await postroom.asend(to=request.form["email"], subject=request.form["subject"],
                                      text="Hi from an async view")
        return jsonify(id=msg_id), 202

    return app
