"""What an OAuth failure means and what to do about it, as one table.

Errors come from the token endpoint (RFC 6749 section 5.2 ``error`` codes, plus Microsoft's
``AADSTS<number>`` in ``error_description``), from the authorization redirect (section
4.1.2.1), and from the mail server after a token was presented (SMTP 334 challenge, 535
5.7.139). Each becomes an :class:`~postroom.exceptions.AuthError` with a stable ``code``, a
message that says the cause and the fix, and ``permanent = False``: mail waiting on a grant
that must be renewed stays queued until it is, or until its lifetime ends.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

from postroom.exceptions import AuthError, DeliveryError


class GrantError(AuthError):
    """An OAuth failure; ``dead`` when only a new sign-in can fix it."""

    code = "oauth.error"
    permanent = False
    dead = False


@dataclass(frozen=True)
class Cause:
    code: str
    why: str
    fix: str
    dead: bool = False  # the grant is unusable: only a new sign-in (consent) helps


RELOGIN = "sign in again: {signin}"
# How to sign in, with the link only where a Postroom serves it (server.http_listen on, or
# [oauth] public_url): a link to a listener that is off leads nowhere.
SIGN_IN_LINK = "open {link} (or run `postroom oauth login {connection}`)"
SIGN_IN_DEVICE = ("run `postroom oauth login {connection} --device` (a code to enter on any "
                  "device; the sign-in link needs server.http_listen, which is off)")
SIGN_IN_NO_DEVICE = ("turn on server.http_listen (or set [oauth] public_url to a node that has "
                     "it), then run `postroom oauth login {connection}` and open the link it "
                     "prints: the provider allows no mail permission in the device-code flow")


def sign_in_how(connection: str, link: str, *, device: bool = True) -> str:
    """How to sign ``connection`` in: the link where one is served, else a code on another
    device where the provider allows it for mail (Google does not), else what to turn on."""
    text = SIGN_IN_LINK if link else SIGN_IN_DEVICE if device else SIGN_IN_NO_DEVICE
    return text.replace("{link}", link).replace("{connection}", connection)

CAUSES: dict[str, Cause] = {
    "invalid_grant": Cause(
        "oauth.invalid_grant",
        "the provider no longer accepts this grant's refresh token: access was withdrawn, the "
        "password changed, the token expired (unused too long, or issued to an app in a test "
        "mode) or was replaced", RELOGIN, dead=True),
    "idle_grant": Cause(
        "oauth.invalid_grant",
        "the refresh token expired because it was not used for too long (Microsoft: 90 days)",
        RELOGIN, dead=True),
    "consent_required": Cause(
        "oauth.consent_required",
        "the account has not consented (or no longer consents) to the permissions Postroom "
        "asks for", RELOGIN, dead=True),
    "admin_consent_required": Cause(
        "oauth.admin_consent_required",
        "the organisation requires an administrator to approve this app before its users "
        "may grant it access",
        "an administrator of the tenant grants admin consent to the app (Entra admin center "
        "> Enterprise applications > the app > Permissions > Grant admin consent), then "
        + RELOGIN, dead=True),
    "interaction_required": Cause(
        "oauth.interaction_required",
        "the provider wants the user to sign in interactively again (multi-factor sign-in, a "
        "Conditional Access policy, or a changed password)", RELOGIN, dead=True),
    "invalid_client": Cause(
        "oauth.invalid_client",
        "the provider does not accept the client: a wrong client_id or client secret, an "
        "expired secret, or an app registration that was deleted",
        "compare the connection's oauth client_id and client secret with the app registration "
        "({console}); create a new secret if it expired"),
    "unauthorized_client": Cause(
        "oauth.unauthorized_client",
        "the app registration does not allow this grant, or is not known in this tenant",
        "enable the grant type for the app ({console}); for Microsoft check oauth.tenant and "
        "that the app is registered (or consented) in that tenant"),
    "redirect_uri_mismatch": Cause(
        "oauth.redirect_uri_mismatch",
        "the redirect URI Postroom sent ({redirect_uri}) is not one registered for this client",
        "register exactly {redirect_uri} as a redirect URI of the app ({console}), or set "
        "[oauth] public_url (or the connection's oauth.redirect_uri) to the one registered"),
    "invalid_scope": Cause(
        "oauth.invalid_scope",
        "the provider refused the scopes asked for ({scopes})",
        "allow these scopes (APIs) for the app ({console}), or correct oauth.scopes"),
    "scope_missing": Cause(
        "oauth.scope_missing",
        "the grant lacks the permission to send mail (granted: {granted}; needed: {needed})",
        "sign in again and accept every permission asked for: " + RELOGIN, dead=True),
    "access_denied": Cause(
        "oauth.access_denied", "the user declined to grant access",
        "sign in again and accept, signed in as the mailbox's account: {signin}"),
    "expired_token": Cause(
        "oauth.device_expired", "the device code expired before it was approved",
        "run `postroom oauth login {connection} --device` again and approve within the time "
        "shown"),
    "no_grant": Cause(
        "oauth.no_grant", "this connection has no OAuth grant yet",
        "sign in: {signin}"),
    "client_changed": Cause(
        "oauth.client_changed",
        "the grant was made for another client_id than the one configured now",
        RELOGIN, dead=True),
    "secret_missing": Cause(
        "oauth.secret_missing", "the client secret is configured but unavailable: {detail}",
        "set the variable for the Postroom process, or fix client_secret_file"),
    "unavailable": Cause(
        "oauth.unavailable",
        "the provider's token endpoint could not be reached or failed ({detail})",
        "nothing to change if it is passing: Postroom retries; check this machine's network "
        "and proxy (HTTPS_PROXY) if it persists"),
}

# Causes whose whole fix is to sign in again: the advice catalog's oauth.invalid_grant and
# oauth.sign_in entries say how (postroom/diagnostics/advice.toml).
SIGN_IN_FIXES = frozenset({"invalid_grant", "idle_grant", "consent_required",
                           "interaction_required", "client_changed", "no_grant",
                           "access_denied", "scope_missing"})

# Microsoft's error numbers (error_description "AADSTS65001: ..."), from the Entra ID
# "Authentication and authorization error codes" reference. They say more than ``error``.
AADSTS: dict[int, str] = {
    65001: "consent_required",
    65004: "access_denied",
    90094: "admin_consent_required",
    90095: "admin_consent_required",
    700082: "idle_grant",
    70008: "invalid_grant",
    50173: "invalid_grant",
    54005: "invalid_grant",
    50076: "interaction_required",
    50079: "interaction_required",
    53003: "interaction_required",
    7000215: "invalid_client",
    7000222: "invalid_client",
    700016: "unauthorized_client",
    50011: "redirect_uri_mismatch",
    70011: "invalid_scope",
}
_AADSTS = re.compile(r"AADSTS(\d+)")
# Generic "error" values with the same meaning as one of ours.
_ALIASES = {"invalid_request_uri": "redirect_uri_mismatch", "deleted_client": "invalid_client",
            "org_internal": "unauthorized_client", "admin_policy_enforced": "access_denied",
            "login_required": "interaction_required", "temporarily_unavailable": "unavailable",
            "server_error": "unavailable"}


def classify(error: str, description: str | None = None) -> str:
    """The key in CAUSES for a provider's ``error`` (and ``error_description``)."""
    m = _AADSTS.search(description or "")
    if m and int(m.group(1)) in AADSTS:
        return AADSTS[int(m.group(1))]
    key = _ALIASES.get(error, error)
    if key == "invalid_grant" and re.search(r"redirect_uri", description or "", re.I):
        return "redirect_uri_mismatch"  # DOT and others report it as invalid_grant
    return key if key in CAUSES else "invalid_grant" if error == "invalid_grant" else ""


def failure(key: str, connection: str, *, said: str = "", **fill: str) -> GrantError:
    """An AuthError saying cause and fix for CAUSES[key] (transient: the mail waits)."""
    cause = CAUSES.get(key)
    if cause is None:
        return GrantError(f"connection {connection}: OAuth error: {said}")
    values = {"connection": connection, "link": "", "console":
              "the provider's developer console", "redirect_uri": "?", "scopes": "?",
              "granted": "?", "needed": "?", "detail": said, **fill}
    if not values["link"].startswith(("http://", "https://")):
        values["link"] = ""  # a relative link is no address a user can open
    if "signin" not in fill:
        values["signin"] = sign_in_how(connection, values["link"])

    def text(s: str) -> str:
        for k in ("signin", *values):  # {signin} holds other fields: it goes first
            s = s.replace("{" + k + "}", values[k])
        return s

    provider_said = f" (the provider said: {said})" if said and key not in (
        "unavailable", "secret_missing") else ""
    why = f"{text(cause.why)}{provider_said}"
    # reply_text is the line an attempt shows as its error. Where the fix is a sign-in, the
    # advice catalog words it (with how to sign in on this instance), so the line holds the
    # cause alone and the fix is printed once; other fixes stay in the line.
    err = GrantError(f"connection {connection}: {why}. Fix: {text(cause.fix)}", code=cause.code,
                     reply_text=why if key in SIGN_IN_FIXES else None)
    err.dead = cause.dead
    return err


# -- after a token was presented to a mail server ------------------------------------------------
def _challenge(transcript: str) -> dict[str, str] | None:
    """The JSON of an XOAUTH2/OAUTHBEARER error challenge ("334 <base64 JSON>"), if any."""
    for line in transcript.splitlines():
        if line.startswith("S: 334 "):
            try:
                data = json.loads(base64.b64decode(line[7:].strip(), validate=False))
            except ValueError:
                continue
            if isinstance(data, dict):
                return {str(k): str(v) for k, v in data.items()}
    return None


def explain_smtp(err: DeliveryError, transcript: str, username: str, *,
                 account: str | None = None) -> DeliveryError:
    """A clearer AuthError for an SMTP AUTH XOAUTH2/OAUTHBEARER refusal. Codes stay under
    ``auth.rejected`` (so the general advice for it still applies) and the error is
    transient: a token problem is fixed by signing in again, and the mail waits for it.
    ``account``: who signed in for the grant, when known; another account than
    ``username`` is the cause whatever the server's challenge says."""
    reply = err.reply_text or ""
    ch = _challenge(transcript) or {}
    status = ch.get("status", "")
    retried = "refreshing it once" in transcript
    if "5.7.139" in reply and re.search(r"smtpclientauthentication is disabled|"
                                         r"smtp_auth_disabled", reply, re.I):
        why = ("Microsoft 365 has SMTP AUTH turned off for this tenant or mailbox; that blocks "
               "OAuth (XOAUTH2) too")
        fix = ('send through Microsoft Graph instead (transport = "msgraph", the same sign-in '
               "with the Mail.Send permission), or have an Exchange admin turn on Authenticated "
               "SMTP for the mailbox (https://aka.ms/smtp_auth_disabled)")
        code = "auth.rejected.smtp_auth_disabled"
    elif account and account.casefold() != username.casefold():
        why = (f"account mismatch: the token is for {account} (who signed in), but the "
               f"connection logs in as {username!r}; servers accept a token only for its own "
               "account")
        fix = (f"set the connection's username = \"{account}\" (and send as that address or "
               f"an alias it may use), or sign in again as {username}")
        code = "auth.rejected.oauth_account"
    else:
        if status == "400" or status.startswith("5"):
            why = (f"the server refused the token for user {username!r}: the account that "
                   "granted access is not this username (or the message's sender is not that "
                   "account), or the grant lacks the mail scope "
                   f"({ch.get('scope', '?')})")
            fix = ("set the connection's username to exactly the account that signed in "
                   "(`postroom oauth status` shows it) and send as that address or an alias it "
                   "may use; or sign in again as the mailbox's own account")
            code = "auth.rejected.oauth_account"
        else:
            after = ", even after one refresh" if retried else ""
            why = (f"the server refused the access token (challenge status {status or '?'}): "
                   f"it expired or was revoked{after}, or it was granted by another account "
                   f"than {username!r}")
            fix = "sign in again: `postroom oauth login CONNECTION` (see `postroom oauth status`)"
            code = "auth.rejected.oauth_token"
    out = AuthError(f"{err.message} — {why}. Fix: {fix}", code=code, permanent=False,
                    reply_code=err.reply_code, reply_text=err.reply_text)
    return out
