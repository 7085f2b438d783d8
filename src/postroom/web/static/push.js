/* The account page's "Send alerts to this browser" (web/templates/_push.html, web/push.py):
   registers the service worker (/admin/push-worker.js, scope /admin/), subscribes with the
   instance's VAPID public key (data-key) and posts the subscription with the session's
   CSRF token; "Stop" unsubscribes and tells the server. The messages come translated from
   the panel's data-msg-* attributes; a browser's own error text is added as it is. */
(function () {
  "use strict";
  var panel = document.getElementById("push-panel");
  if (!panel) {
    return;
  }
  var meta = document.querySelector('meta[name="csrf-token"]');
  var token = meta ? meta.getAttribute("content") : "";
  var status = document.getElementById("push-status");
  var on = document.getElementById("push-on");
  var off = document.getElementById("push-off");
  var SLOW_MS = 20000;

  function say(name, detail) {
    status.textContent = panel.getAttribute("data-msg-" + name) + (detail ? " " + detail : "");
    status.setAttribute("data-state", name);
  }
  function show(subscribed) {
    on.hidden = subscribed;
    off.hidden = !subscribed;
    say(subscribed ? "on" : "off");
  }
  /* applicationServerKey: the base64url public key as bytes. */
  function keyBytes(text) {
    var b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    var raw = window.atob(b64 + "===".slice((b64.length + 3) % 4));
    var out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i += 1) {
      out[i] = raw.charCodeAt(i);
    }
    return out;
  }
  function describe(err) {
    return err && (err.name || err.message) ? String(err.name) + ": " + String(err.message) : "";
  }
  function post(url, body, type) {
    return fetch(url, {method: "POST", body: body, credentials: "same-origin",
                       redirect: "manual",
                       headers: {"Content-Type": type, "X-CSRF-Token": token}});
  }

  if (!("serviceWorker" in navigator) || !("PushManager" in window) ||
      !("Notification" in window) || !window.isSecureContext) {
    say("unsupported");
    return;
  }
  var ready = navigator.serviceWorker.register(panel.getAttribute("data-worker"),
                                               {scope: panel.getAttribute("data-scope")})
    .then(function (reg) { return navigator.serviceWorker.ready.then(function () { return reg; }); });
  ready.then(function (reg) { return reg.pushManager.getSubscription(); })
    .then(function (sub) { show(Boolean(sub)); },
          function (err) { on.hidden = true; off.hidden = true; say("unsupported", describe(err)); });

  on.addEventListener("click", function () {
    say("working");
    on.disabled = true;
    Notification.requestPermission().then(function (permission) {
      if (permission !== "granted") {
        say("denied");
        return null;
      }
      /* A browser whose push service cannot be reached (Chromium's is Google's) may keep
         trying for minutes without an answer: say so meanwhile. */
      var slow = window.setTimeout(function () { say("slow"); }, SLOW_MS);
      return ready.then(function (reg) {
        return reg.pushManager.subscribe({userVisibleOnly: true,
                                          applicationServerKey: keyBytes(panel.getAttribute("data-key"))});
      }).finally(function () { window.clearTimeout(slow); }).then(function (sub) {
        return post("/admin/account/push", JSON.stringify(sub.toJSON()), "application/json")
          .then(function (response) {
            if (response.status === 201) {
              window.location.reload();
              return null;
            }
            return response.json().then(function (body) {
              sub.unsubscribe();
              say("refused", body && body.error ? body.error.message : String(response.status));
            }, function () { sub.unsubscribe(); say("refused", String(response.status)); });
          });
      }, function (err) { say("failed", describe(err)); });
    }).finally(function () { on.disabled = false; });
  });

  off.addEventListener("click", function () {
    say("working");
    ready.then(function (reg) { return reg.pushManager.getSubscription(); })
      .then(function (sub) {
        if (!sub) {
          show(false);
          return null;
        }
        var endpoint = sub.endpoint;
        return sub.unsubscribe().then(function () {
          var body = "csrf=" + encodeURIComponent(token) + "&endpoint=" + encodeURIComponent(endpoint);
          return post("/admin/account/push/remove", body, "application/x-www-form-urlencoded");
        }).then(function () { window.location.assign("/admin/account?done=push_off"); });
      }, function (err) { say("failed", describe(err)); });
  });
})();
