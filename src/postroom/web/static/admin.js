/* Postroom's web admin: progressive enhancement only. Every page works without this file.
   htmx requests carry the session's CSRF token in X-CSRF-Token (forms carry it in a hidden
   field "csrf"); the token comes from <meta name="csrf-token">, never from a cookie. */
(function () {
  "use strict";
  var meta = document.querySelector('meta[name="csrf-token"]');
  var token = meta ? meta.getAttribute("content") : "";
  document.addEventListener("htmx:configRequest", function (event) {
    if (token) {
      event.detail.headers["X-CSRF-Token"] = token;
    }
  });
  /* Buttons marked data-confirm ask before their form is sent. */
  document.addEventListener("submit", function (event) {
    var button = event.submitter;
    var question = button && button.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });
  /* A file picker marked data-fill="ID" reads the chosen file into the text field ID (the
     settings import: page forms are urlencoded, so the text is what is sent). */
  document.addEventListener("change", function (event) {
    var input = event.target;
    var target = input && input.getAttribute && document.getElementById(
      input.getAttribute("data-fill") || "");
    if (!target || !input.files || !input.files[0]) {
      return;
    }
    var reader = new FileReader();
    reader.onload = function () { target.value = String(reader.result); };
    reader.readAsText(input.files[0]);
  });
  /* The log's live rows (data-live): no polling while the tab is hidden. */
  document.addEventListener("htmx:beforeRequest", function (event) {
    if (document.hidden && event.detail.elt.hasAttribute("data-live")) {
      event.preventDefault();
    }
  });
  /* A data-pick-all checkbox ticks every row checkbox of its table. */
  document.addEventListener("change", function (event) {
    var box = event.target;
    if (!box.hasAttribute || !box.hasAttribute("data-pick-all")) {
      return;
    }
    box.closest("table").querySelectorAll("tbody input[type=checkbox]").forEach(
      function (row) { row.checked = box.checked; });
  });
})();
