/* Postroom's service worker (served at /admin/push-worker.js, scope /admin/): shows each Web
   Push alert (postroom.alerts.webpush: the alert as JSON, with "url", the admin page it
   concerns) as a notification, and opens that page on a click. It does nothing else: no
   caching, no fetch handler. */
"use strict";

self.addEventListener("push", function (event) {
  var data = {};
  if (event.data) {
    try {
      data = event.data.json();
    } catch (err) {
      data = {text: event.data.text()};
    }
  }
  /* Only a page of the admin: the payload is encrypted and signed for this browser, but a
     notification must never lead elsewhere. */
  var url = typeof data.url === "string" && data.url.indexOf("/admin/") === 0 ? data.url : "/admin/events";
  var title = "Postroom: " + (typeof data.title === "string" ? data.title : "alert");
  event.waitUntil(self.registration.showNotification(title, {
    body: typeof data.text === "string" ? data.text : "",
    tag: typeof data.key === "string" ? data.key : undefined,
    requireInteraction: data.severity === "error" && data.change === "opened",
    data: {url: url}
  }));
});

self.addEventListener("notificationclick", function (event) {
  event.notification.close();
  var path = event.notification.data && event.notification.data.url || "/admin/";
  var url = new URL(path, self.location.origin).href;
  event.waitUntil(self.clients.matchAll({type: "window", includeUncontrolled: true})
    .then(function (list) {
      for (var i = 0; i < list.length; i += 1) {
        if (list[i].url === url && "focus" in list[i]) {
          return list[i].focus();
        }
      }
      return self.clients.openWindow(url);
    }));
});
