/*
 * Threadline web messenger widget. Plain JavaScript, no framework, no build step.
 *
 *   <script src="https://threadline.example.com/widget/threadline.js"></script>
 *   <script>Threadline.init({appId: "...", integrationId: "..."});</script>
 *
 * Talks to the `web` service: POST .../sessions once (the session is kept in localStorage; it
 * is pending, and creates nobody, until the first message, POST .../conversations, starts the
 * conversation), POST messages/activity, POST .../sessions/refresh before the session token
 * expires, and one WebSocket that replays history after the last cursor seen and then streams
 * live frames. Stable hooks for tests and styling: [data-threadline=...].
 */
(function () {
  "use strict";

  if (window.Threadline && window.Threadline.version) {
    return;
  }

  var SCRIPT_BASE = (function () {
    var script = document.currentScript;
    if (!script || !script.src) {
      return window.location.origin;
    }
    var url = new URL(script.src, window.location.href);
    return url.origin;
  })();

  var RECONNECT_BASE_MS = 500;
  var RECONNECT_CAP_MS = 30000;
  var POST_RETRY_CAP_MS = 30000;
  var TYPING_IDLE_MS = 3000;
  var BUSINESS_TYPING_TIMEOUT_MS = 15000;
  var CONNECT_TIMEOUT_MS = 10000;
  var REFRESH_MARGIN_MS = 5 * 60 * 1000;   // renew the session token this long before it expires
  var DEFAULT_MAX_UPLOAD_BYTES = 25 * 1024 * 1024;  // until the integration's config says otherwise
  // What a customer may attach: the types Threadline keeps (shared/media.py ALLOWED_TYPES).
  var UPLOAD_TYPES = ["image/jpeg", "image/png", "image/gif", "image/webp", "application/pdf", "audio/mpeg",
    "audio/ogg", "audio/aac", "audio/mp4", "audio/amr", "video/mp4", "video/3gpp", "text/plain", "text/csv",
    "application/zip", "application/msword", "application/vnd.ms-excel", "application/vnd.ms-powerpoint",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation"];
  // The type of a file the browser could not name (or named after the spreadsheet program that
  // opens it, as Windows does for .csv), by its extension.
  var UPLOAD_EXTENSIONS = {jpg: "image/jpeg", jpeg: "image/jpeg", png: "image/png", gif: "image/gif",
    webp: "image/webp", pdf: "application/pdf", mp3: "audio/mpeg", ogg: "audio/ogg", oga: "audio/ogg",
    aac: "audio/aac", m4a: "audio/mp4", amr: "audio/amr", mp4: "video/mp4", "3gp": "video/3gpp", txt: "text/plain",
    csv: "text/csv", zip: "application/zip", doc: "application/msword", xls: "application/vnd.ms-excel",
    ppt: "application/vnd.ms-powerpoint",
    docx: "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    xlsx: "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    pptx: "application/vnd.openxmlformats-officedocument.presentationml.presentation"};
  var UPLOAD_KINDS = "images, PDFs, audio, video, text and CSV files, office documents and zip files";
  var PAPERCLIP_ICON = '<svg width="18" height="18" viewBox="0 0 24 24" aria-hidden="true"><path fill="currentColor" ' +
    'd="M16.5 6v11.5a4 4 0 0 1-8 0V5a2.5 2.5 0 0 1 5 0v10.5a1 1 0 0 1-2 0V6H10v9.5a2.5 2.5 0 0 0 5 0V5a4 4 0 0 ' +
    '0-8 0v12.5a5.5 5.5 0 0 0 11 0V6h-1.5z"/></svg>';

  var CSS = [
    ".tl-root{position:fixed;right:20px;bottom:20px;z-index:2147483000;font:14px/1.4 system-ui,-apple-system,",
    "'Segoe UI',Roboto,sans-serif;color:#1f2328}",
    ".tl-launcher{width:56px;height:56px;border-radius:50%;border:0;background:var(--tl-brand,#2b59c3);",
    "color:#fff;cursor:pointer;box-shadow:0 4px 14px rgba(0,0,0,.25);position:relative;display:flex;",
    "align-items:center;justify-content:center}",
    ".tl-unread{position:absolute;top:-4px;right:-4px;min-width:20px;height:20px;border-radius:10px;",
    "background:#d1242f;color:#fff;font-size:12px;line-height:20px;padding:0 5px;box-sizing:border-box}",
    ".tl-panel{position:absolute;right:0;bottom:70px;width:340px;max-width:calc(100vw - 40px);height:480px;",
    "max-height:calc(100vh - 110px);background:#fff;border-radius:12px;box-shadow:0 8px 30px rgba(0,0,0,.25);",
    "display:flex;flex-direction:column;overflow:hidden}",
    ".tl-panel[hidden]{display:none}",
    ".tl-header{display:flex;align-items:center;gap:8px;padding:12px 14px;background:var(--tl-brand,#2b59c3);",
    "color:#fff}",
    ".tl-title{flex:1;font-weight:600;min-width:0;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}",
    ".tl-status{font-size:11px;opacity:.85}",
    ".tl-close{background:none;border:0;color:#fff;font-size:20px;cursor:pointer;line-height:1}",
    ".tl-messages{flex:1;overflow-y:auto;padding:12px;display:flex;flex-direction:column;gap:6px;",
    "background:#f6f8fa}",
    ".tl-message{display:flex;flex-direction:column;max-width:80%}",
    ".tl-message[data-author=user]{align-self:flex-end;align-items:flex-end}",
    ".tl-message[data-author=business]{align-self:flex-start;align-items:flex-start}",
    ".tl-bubble{padding:8px 12px;border-radius:14px;white-space:pre-wrap;word-wrap:break-word;",
    "overflow-wrap:anywhere}",
    ".tl-message[data-author=user] .tl-bubble{background:var(--tl-brand,#2b59c3);color:#fff}",
    ".tl-message[data-author=business] .tl-bubble{background:#fff;border:1px solid #d0d7de}",
    ".tl-message[data-status=pending] .tl-bubble{opacity:.6}",
    ".tl-message[data-status=failed] .tl-bubble{background:#d1242f;cursor:pointer}",
    ".tl-meta{font-size:11px;color:#656d76;margin-top:2px;min-height:0}",
    // The label is CSS-generated content so a message node's text stays exactly its content.
    ".tl-meta::before{content:attr(data-label)}",
    ".tl-message[data-status=failed] .tl-meta::before{content:'Not sent \\B7  tap to retry';color:#d1242f}",
    ".tl-bubble img{max-width:100%;border-radius:8px;display:block}",
    ".tl-img-missing{display:flex;align-items:center;justify-content:center;gap:6px;min-width:160px;",
    "height:96px;border-radius:8px;background:#eaeef2;color:#656d76;font-size:12px}",
    ".tl-message[data-author=user] .tl-img-missing{background:rgba(255,255,255,.2);color:#fff}",
    ".tl-seen{align-self:flex-end;font-size:11px;color:#656d76}",
    ".tl-typing{padding:0 14px 6px;font-size:12px;color:#656d76;background:#f6f8fa}",
    ".tl-typing[hidden]{display:none}",
    ".tl-composer{display:flex;gap:6px;padding:10px;border-top:1px solid #d0d7de}",
    ".tl-input{flex:1;resize:none;border:1px solid #d0d7de;border-radius:8px;padding:8px;font:inherit;",
    "height:38px;box-sizing:border-box}",
    ".tl-send{border:0;border-radius:8px;background:var(--tl-brand,#2b59c3);color:#fff;padding:0 14px;",
    "cursor:pointer;font:inherit}",
    // "Continue on…": the header button, its panel (channels, then the link and QR code) and
    // the system lines the conversation's moves leave in the thread.
    ".tl-continue{background:rgba(255,255,255,.16);border:1px solid rgba(255,255,255,.65);color:#fff;",
    "border-radius:999px;padding:2px 10px;font:inherit;font-size:12px;cursor:pointer;white-space:nowrap}",
    ".tl-continue[hidden],.tl-handoff[hidden]{display:none}",
    ".tl-handoff{display:flex;flex-direction:column;gap:8px;padding:10px 12px;background:#fff;",
    "border-bottom:1px solid #d0d7de;max-height:65%;overflow-y:auto}",
    ".tl-handoff-title{font-weight:600}",
    ".tl-handoff-options{display:flex;flex-wrap:wrap;gap:6px}",
    ".tl-option{border:1px solid #d0d7de;background:#f6f8fa;border-radius:8px;padding:6px 12px;font:inherit;",
    "cursor:pointer;color:inherit}",
    ".tl-option:hover,.tl-option:focus-visible{border-color:var(--tl-brand,#2b59c3)}",
    ".tl-link{display:block;text-align:center;background:var(--tl-brand,#2b59c3);color:#fff;border-radius:8px;",
    "padding:8px 12px;text-decoration:none;font-weight:600}",
    ".tl-qr{display:block;align-self:center;width:144px;height:144px;border:1px solid #d0d7de;border-radius:8px}",
    ".tl-hint{font-size:12px;color:#656d76}",
    ".tl-handoff-error{font-size:12px;color:#d1242f}",
    ".tl-linkish{align-self:flex-start;background:none;border:0;padding:0;font:inherit;font-size:12px;",
    "color:var(--tl-brand,#2b59c3);text-decoration:underline;cursor:pointer}",
    ".tl-system{align-self:center;max-width:90%;text-align:center;font-size:12px;color:#656d76;",
    "background:#eaeef2;border-radius:10px;padding:4px 10px}",
    ".tl-system[data-kind=failed],.tl-system[data-kind=link-refused]{color:#d1242f;background:#ffebe9}",
    // Rich messages: buttons in the bubble, quick replies under the latest message, carousels,
    // lists and forms.
    ".tl-actions{display:flex;flex-direction:column;gap:4px;margin-top:8px;white-space:normal}",
    ".tl-action{display:block;box-sizing:border-box;width:100%;border:1px solid var(--tl-brand,#2b59c3);",
    "background:#fff;color:var(--tl-brand,#2b59c3);border-radius:8px;padding:6px 10px;font:inherit;",
    "text-align:center;text-decoration:none;cursor:pointer}",
    ".tl-action:hover,.tl-action:focus-visible,.tl-chip:hover,.tl-chip:focus-visible{background:#eef3fc}",
    ".tl-action:focus-visible,.tl-chip:focus-visible{outline:2px solid var(--tl-brand,#2b59c3);outline-offset:1px}",
    ".tl-action[disabled],.tl-action[aria-busy=true],.tl-action[aria-disabled=true],.tl-chip[disabled]{opacity:.6;",
    "cursor:default}",
    ".tl-action[data-state=failed]{border-color:#d1242f;color:#d1242f}",
    ".tl-replies{display:flex;flex-wrap:wrap;justify-content:flex-end;gap:6px;align-self:flex-end;max-width:90%}",
    ".tl-chip{display:inline-flex;align-items:center;gap:4px;border:1px solid var(--tl-brand,#2b59c3);",
    "background:#fff;color:var(--tl-brand,#2b59c3);border-radius:999px;padding:4px 12px;font:inherit;",
    "cursor:pointer}",
    ".tl-chip-icon{width:16px;height:16px;border-radius:50%}",
    ".tl-message[data-type=carousel]{max-width:100%;align-self:stretch}",
    ".tl-message[data-type=carousel] .tl-bubble,.tl-message[data-type=list] .tl-bubble{padding:0;",
    "white-space:normal}",
    ".tl-message[data-type=carousel] .tl-bubble{border:0;background:none;align-self:stretch;min-width:0;",
    "max-width:100%}",
    ".tl-message[data-type=list],.tl-message[data-type=form]{min-width:70%}",
    ".tl-carousel{display:flex;gap:8px;overflow-x:auto;scroll-snap-type:x mandatory;padding:2px 2px 6px}",
    ".tl-carousel:focus-visible{outline:2px solid var(--tl-brand,#2b59c3)}",
    ".tl-card{flex:0 0 200px;scroll-snap-align:start;display:flex;flex-direction:column;background:#fff;",
    "border:1px solid #d0d7de;border-radius:12px;overflow:hidden}",
    ".tl-card .tl-item-media{width:100%;aspect-ratio:1.91/1;object-fit:cover;border-radius:0}",
    ".tl-carousel[data-aspect=square] .tl-item-media{aspect-ratio:1/1}",
    ".tl-card .tl-item-body{display:flex;flex-direction:column;gap:2px;padding:8px 10px;flex:1}",
    ".tl-card .tl-actions{margin-top:auto;padding-top:6px}",
    ".tl-item-title{font-weight:600}",
    ".tl-item-description{font-size:12px;color:#656d76}",
    ".tl-list{display:flex;flex-direction:column}",
    ".tl-list-item{display:flex;gap:10px;padding:8px 10px;border-bottom:1px solid #d0d7de}",
    ".tl-list-item .tl-item-media{width:56px;height:56px;object-fit:cover;flex:none;border-radius:6px}",
    ".tl-list-item .tl-item-body{flex:1;min-width:0}",
    ".tl-list>.tl-actions{padding:8px 10px;margin:0}",
    ".tl-form{display:flex;flex-direction:column;gap:8px;white-space:normal;min-width:200px}",
    ".tl-form-field{display:flex;flex-direction:column;gap:2px}",
    ".tl-form-field label{font-size:12px;color:#656d76}",
    ".tl-form-input{border:1px solid #d0d7de;border-radius:6px;padding:6px 8px;font:inherit;background:#fff;",
    "color:inherit}",
    ".tl-form-input:disabled{background:#f6f8fa;color:#1f2328}",
    ".tl-form[data-state=submitted] .tl-form-submit{border-color:#d0d7de;color:#656d76}",
    ".tl-form-error{font-size:12px;color:#d1242f}",
    ".tl-form-error[hidden]{display:none}",
    ".tl-input:disabled{background:#f6f8fa}",
    ".tl-send:disabled{opacity:.6;cursor:default}",
    // Attachments: the paper clip, the drop target, an upload on its way, what was refused.
    ".tl-attach{flex:none;width:38px;border:1px solid #d0d7de;border-radius:8px;background:#fff;",
    "color:#656d76;cursor:pointer;display:flex;align-items:center;justify-content:center;padding:0}",
    ".tl-attach:hover,.tl-attach:focus-visible{color:var(--tl-brand,#2b59c3);border-color:var(--tl-brand,#2b59c3)}",
    ".tl-attach:disabled{opacity:.6;cursor:default}",
    ".tl-file{display:none}",
    ".tl-panel[data-dragging=true] .tl-messages{outline:2px dashed var(--tl-brand,#2b59c3);outline-offset:-6px;",
    "background:#eef3fc}",
    ".tl-attach-error{padding:6px 12px 0;font-size:12px;color:#d1242f}",
    ".tl-attach-error[hidden]{display:none}",
    ".tl-upload-name{display:block;font-size:12px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}",
    ".tl-progress{display:block;width:160px;max-width:100%;height:6px;margin-top:6px}",
    ".tl-message[data-author=user] .tl-bubble a{color:inherit}",
    ".tl-preview{min-width:160px;height:96px;border-radius:8px;background:rgba(255,255,255,.2);",
    "display:flex;align-items:center;justify-content:center;font-size:12px}"
  ].join("");

  // How the widget names a channel: on its buttons ("Continue on WhatsApp") and in the thread.
  var CHANNEL_NAMES = {whatsapp: "WhatsApp", messenger: "Messenger", telegram: "Telegram", twilio: "SMS",
    sms: "SMS", android: "our app", ios: "our app", mailgun: "e-mail"};
  // What the customer does once the link opened the channel.
  var CHANNEL_STEPS = {
    whatsapp: "Open WhatsApp and send the message that is filled in for you.",
    twilio: "Open your messages app and send the text that is filled in for you.",
    messenger: "Open Messenger and tap Get Started.",
    telegram: "Open Telegram and tap Start.",
    android: "Open the link on the phone where our app is installed.",
    ios: "Open the link on the phone where our app is installed.",
    mailgun: "Send the e-mail that is filled in for you; our answers will come by e-mail."
  };
  // Links the widget will show: the channels' deep links (https wa.me/m.me/t.me, sms:, mailto:) and, in
  // a sandbox, the plain-http app page. Never javascript: or data: URLs.
  var LINK_SCHEMES = ["http:", "https:", "sms:", "mailto:"];
  // What message content may point at (media, link actions, QR codes).
  var WEB_SCHEMES = ["http:", "https:"];

  // The URL to put in an href or src, as the browser itself parses it, when its scheme is one of
  // `schemes` (default: http and https); else null. Everything a message or the API hands the
  // widget goes through this, whatever the server let through (e.g. data stored long ago).
  function safeUrl(value, schemes) {
    if (typeof value !== "string" || !value) {
      return null;
    }
    var parsed;
    try {
      parsed = new URL(value);
    } catch (e) {
      return null;
    }
    return (schemes || WEB_SCHEMES).indexOf(parsed.protocol) >= 0 ? parsed.href : null;
  }

  function channelName(type) {
    return CHANNEL_NAMES[type] || "another channel";
  }

  function capitalize(text) {
    return text.charAt(0).toUpperCase() + text.slice(1);
  }

  // Desktop: a fine pointer (no touch screen) or a wide screen, where a QR code helps.
  function isDesktop() {
    var coarse = window.matchMedia && window.matchMedia("(pointer: coarse)").matches;
    return !coarse || window.innerWidth >= 1024;
  }

  function injectCss() {
    if (document.getElementById("threadline-css")) {
      return;
    }
    var style = document.createElement("style");
    style.id = "threadline-css";
    style.textContent = CSS;
    (document.head || document.documentElement).appendChild(style);
  }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      node.setAttribute(key, attrs[key]);
    });
    if (text !== undefined) {
      node.textContent = text;
    }
    return node;
  }

  function uuid() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") {
      return window.crypto.randomUUID();
    }
    var bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    var hex = Array.prototype.map.call(bytes, function (b) {
      return (b + 0x100).toString(16).slice(1);
    }).join("");
    return hex.slice(0, 8) + "-" + hex.slice(8, 12) + "-" + hex.slice(12, 16) + "-" +
      hex.slice(16, 20) + "-" + hex.slice(20);
  }

  // Exponential back-off with "equal jitter": half fixed, half random, capped.
  function backoff(attempt, base, cap) {
    var ceiling = Math.min(cap, base * Math.pow(2, attempt));
    return ceiling / 2 + Math.random() * ceiling / 2;
  }

  function sleep(ms) {
    return new Promise(function (resolve) { setTimeout(resolve, ms); });
  }

  function load(key) {
    try {
      var raw = window.localStorage.getItem(key);
      return raw ? JSON.parse(raw) : null;
    } catch (e) {
      return null;
    }
  }

  function save(key, value) {
    try {
      if (value === null || value === undefined) {
        window.localStorage.removeItem(key);
      } else {
        window.localStorage.setItem(key, JSON.stringify(value));
      }
    } catch (e) {
      /* storage full or disabled: the widget still works for this page view */
    }
  }

  // The handoff code a web link carried (`?threadline_code=`), removed from the address bar so that
  // a reload or a shared URL does not replay it.
  function linkCodeFromPage() {
    var url;
    try {
      url = new URL(window.location.href);
    } catch (e) {
      return null;
    }
    var code = url.searchParams.get("threadline_code");
    if (code === null) {
      return null;
    }
    url.searchParams.delete("threadline_code");
    try {
      window.history.replaceState(window.history.state, "", url.pathname + url.search + url.hash);
    } catch (e) { /* sandboxed frame: the code just stays visible */ }
    return code || null;
  }

  function Widget(options) {
    if (!options || !options.appId || !options.integrationId) {
      throw new Error("Threadline.init needs {appId, integrationId}");
    }
    this.appId = options.appId;
    this.integrationId = options.integrationId;
    this.baseUrl = (options.baseUrl || SCRIPT_BASE).replace(/\/+$/, "");
    this.storageKey = "threadline:" + this.appId + ":" + this.integrationId;
    this.state = load(this.storageKey) || {};
    this.session = this.state.session || null;
    this.outbox = load(this.storageKey + ":outbox") || [];
    this.readCursor = this.state.readCursor || 0;
    this.lastCursor = null;       // highest cursor seen on the socket (resume point)
    this.latestBusinessCursor = 0;
    this.businessReadAt = 0;      // ms; when the business last read the conversation
    this.pending = {};            // clientMessageId -> element
    this.rendered = {};           // message id -> element
    this.forms = {};              // form message id -> its <form>
    this.formAnswers = {};        // form message id -> the customer's answered fields
    this.itemForms = {};          // clientMessageId of a form answer being sent -> its <form>
    this.tapButtons = {};         // clientMessageId of a postback tap being sent -> its button
    this.socket = null;
    this.reconnectAttempt = 0;
    this.reconnectTimer = null;
    this.lastFrameAt = 0;
    this.pingIntervalMs = 30000;
    this.ready = false;
    this.isOpen = false;
    this.destroyed = false;
    this.typingSent = false;
    this.typingTimer = null;
    this.businessTypingTimer = null;
    this.sessionPromise = null;
    this.channels = null;         // where "Continue on…" can take the conversation (null: not loaded)
    this.maxUploadBytes = DEFAULT_MAX_UPLOAD_BYTES;
    this.uploads = [];            // files being uploaded (or whose upload failed), in the order attached
    this.render();
    var self = this;
    this.watchdog = setInterval(function () { self.checkSocket(); }, 1000);
    this.onVisibility = function () { self.maybeSendRead(); };
    this.onOnline = function () { self.reconnectNow(); };
    document.addEventListener("visibilitychange", this.onVisibility);
    window.addEventListener("online", this.onOnline);
    this.loadConfig();
    this.loadChannels();
    var linkCode = options.linkCode !== undefined ? options.linkCode : linkCodeFromPage();
    if (linkCode) {
      // Arrived through a handoff link (from WhatsApp, SMS, …): continue that conversation here.
      this.redeemLink(String(linkCode));
    } else if (this.session) {
      // A returning visitor: restore history and unsent messages right away.
      this.restoreOutbox();
      this.connect();
    }
  }

  Widget.prototype.apiUrl = function (path) {
    return this.baseUrl + "/sdk/v1/apps/" + encodeURIComponent(this.appId) + path;
  };

  Widget.prototype.request = function (method, path, body) {
    var headers = {"Content-Type": "application/json"};
    if (this.session) {
      headers.Authorization = "Bearer " + this.session.sessionToken;
    }
    return fetch(this.apiUrl(path), {
      method: method,
      headers: headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      mode: "cors"
    });
  };

  // --- DOM ------------------------------------------------------------------------------------

  Widget.prototype.render = function () {
    injectCss();
    var self = this;
    this.root = el("div", {"class": "tl-root", "data-threadline": "root"});
    this.launcher = el("button", {"class": "tl-launcher", "data-threadline": "launcher", "type": "button",
      "aria-label": "Open chat"});
    // A static icon (no emoji font needed).
    this.launcher.innerHTML = '<svg width="26" height="26" viewBox="0 0 24 24" aria-hidden="true">' +
      '<path fill="currentColor" d="M4 3h16a2 2 0 0 1 2 2v11a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V5a2 ' +
      '2 0 0 1 2-2z"/></svg>';
    this.unread = el("span", {"class": "tl-unread", "data-threadline": "unread", "hidden": ""}, "0");
    this.launcher.appendChild(this.unread);
    this.panel = el("div", {"class": "tl-panel", "data-threadline": "panel", "hidden": "", "role": "dialog",
      "aria-label": "Chat"});
    var header = el("div", {"class": "tl-header"});
    this.title = el("span", {"class": "tl-title"}, "Chat");
    this.status = el("span", {"class": "tl-status", "data-threadline": "status", "data-state": "idle",
      "aria-live": "polite"}, "");
    var close = el("button", {"class": "tl-close", "data-threadline": "close", "type": "button",
      "aria-label": "Close chat"}, "\u00D7");
    this.continueButton = el("button", {"class": "tl-continue", "data-threadline": "continue", "type": "button",
      "aria-label": "Continue this conversation on another channel", "aria-expanded": "false",
      "aria-controls": "threadline-handoff", "hidden": ""}, "Continue on\u2026");
    this.handoff = el("div", {"class": "tl-handoff", "id": "threadline-handoff", "data-threadline": "handoff",
      "role": "region", "aria-label": "Continue on another channel", "hidden": ""});
    header.appendChild(this.title);
    header.appendChild(this.status);
    header.appendChild(this.continueButton);
    header.appendChild(close);
    this.list = el("div", {"class": "tl-messages", "data-threadline": "messages", "aria-live": "polite"});
    this.typing = el("div", {"class": "tl-typing", "data-threadline": "typing", "hidden": ""}, "typing\u2026");
    var composer = el("form", {"class": "tl-composer", "data-threadline": "composer"});
    this.input = el("textarea", {"class": "tl-input", "data-threadline": "input", "rows": "1",
      "placeholder": "Type a message\u2026", "maxlength": "4096", "aria-label": "Message"});
    this.sendButton = el("button", {"class": "tl-send", "data-threadline": "send", "type": "submit"}, "Send");
    this.attachButton = el("button", {"class": "tl-attach", "data-threadline": "attach", "type": "button",
      "aria-label": "Attach a file", "title": "Attach a file"});
    this.attachButton.innerHTML = PAPERCLIP_ICON;
    this.fileInput = el("input", {"class": "tl-file", "data-threadline": "file-input", "type": "file",
      "multiple": "", "tabindex": "-1", "aria-hidden": "true", "accept": UPLOAD_TYPES.join(",")});
    this.attachError = el("div", {"class": "tl-attach-error", "data-threadline": "attach-error", "role": "alert",
      "hidden": ""});
    composer.appendChild(this.attachButton);
    composer.appendChild(this.fileInput);
    composer.appendChild(this.input);
    composer.appendChild(this.sendButton);
    this.panel.appendChild(header);
    this.panel.appendChild(this.handoff);
    this.panel.appendChild(this.list);
    this.panel.appendChild(this.typing);
    this.panel.appendChild(this.attachError);
    this.panel.appendChild(composer);
    this.root.appendChild(this.panel);
    this.root.appendChild(this.launcher);
    var root = this.root;
    if (document.body) {
      document.body.appendChild(root);
    } else {
      // init() ran from <head>: attach once the body exists.
      document.addEventListener("DOMContentLoaded", function () { document.body.appendChild(root); });
    }

    this.launcher.addEventListener("click", function () { self.toggle(); });
    close.addEventListener("click", function () { self.close(); });
    this.continueButton.addEventListener("click", function () { self.toggleHandoff(); });
    composer.addEventListener("submit", function (event) {
      event.preventDefault();
      self.sendFromInput();
    });
    this.input.addEventListener("keydown", function (event) {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        self.sendFromInput();
      }
    });
    this.input.addEventListener("input", function () { self.onTyping(); });
    this.listenForFiles();
    this.renderNotify();
  };

  Widget.prototype.setStatus = function (state, text) {
    this.status.setAttribute("data-state", state);
    this.status.textContent = text;
  };

  Widget.prototype.loadConfig = function () {
    var self = this;
    fetch(this.apiUrl("/integrations/" + encodeURIComponent(this.integrationId) + "/config"),
      {credentials: "omit", mode: "cors"})
      .then(function (res) { return res.ok ? res.json() : null; })
      .then(function (config) {
        if (!config) {
          return;
        }
        self.title.textContent = config.businessName || config.displayName || "Chat";
        if (typeof config.maxUploadBytes === "number" && config.maxUploadBytes > 0) {
          self.maxUploadBytes = config.maxUploadBytes;
        }
        if (config.brandColor && /^#?[0-9a-fA-F]{3,8}$/.test(config.brandColor)) {
          var color = config.brandColor.charAt(0) === "#" ? config.brandColor : "#" + config.brandColor;
          self.root.style.setProperty("--tl-brand", color);
        }
      })
      .catch(function () { /* cosmetic only */ });
  };

  Widget.prototype.toggle = function () {
    if (this.isOpen) {
      this.close();
    } else {
      this.open();
    }
  };

  Widget.prototype.open = function () {
    this.isOpen = true;
    this.panel.removeAttribute("hidden");
    this.launcher.setAttribute("aria-label", "Close chat");
    this.clearUnread();
    this.input.focus();
    if (!this.socket && !this.reconnectTimer) {
      this.connect();
    }
    this.maybeSendRead();
    this.scrollToEnd();
  };

  Widget.prototype.close = function () {
    this.isOpen = false;
    this.panel.setAttribute("hidden", "");
    this.launcher.setAttribute("aria-label", "Open chat");
    this.stopTyping();
  };

  Widget.prototype.scrollToEnd = function () {
    this.list.scrollTop = this.list.scrollHeight;
  };

  Widget.prototype.clearUnread = function () {
    this.unread.textContent = "0";
    this.unread.setAttribute("hidden", "");
  };

  Widget.prototype.bumpUnread = function () {
    var count = parseInt(this.unread.textContent, 10) + 1;
    this.unread.textContent = String(count);
    this.unread.removeAttribute("hidden");
  };

  // A neat box instead of the browser's broken-image icon (and no retry on every re-render).
  function imagePlaceholder(label) {
    var box = el("div", {"class": "tl-img-missing", "data-threadline": "image-missing", "role": "img",
      "aria-label": label || "image unavailable"});
    box.innerHTML = '<svg width="18" height="18" viewBox="0 0 24 24" aria-hidden="true"><path ' +
      'fill="currentColor" d="M21 5v14H3V5h18m0-2H3a2 2 0 0 0-2 2v14a2 2 0 0 0 2 2h18a2 2 0 0 0 2-2V5a2 2 ' +
      '0 0 0-2-2zm-7.5 9.5L11 15.5l-2-2.5-3 4h12l-3.5-4.5z"/></svg>';
    box.appendChild(el("span", {}, "Image unavailable"));
    return box;
  }

  function pad2(n) {
    return (n < 10 ? "0" : "") + n;
  }

  // "14:05" today, "3 Mar 14:05" on other days (the visitor's local time).
  function formatTime(ms) {
    if (!ms) {
      return "";
    }
    var date = new Date(ms);
    var time;
    try {
      time = date.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
    } catch (e) {
      time = pad2(date.getHours()) + ":" + pad2(date.getMinutes());
    }
    if (date.toDateString() === new Date().toDateString()) {
      return time;
    }
    var day;
    try {
      day = date.toLocaleDateString([], {day: "numeric", month: "short"});
    } catch (e) {
      day = date.getDate() + "/" + (date.getMonth() + 1);
    }
    return day + " " + time;
  }

  function renderImage(bubble, content) {
    var mediaUrl = safeUrl(content.mediaUrl);
    if (mediaUrl) {
      var img = el("img", {"alt": content.altText || "image"});
      img.addEventListener("error", function () {
        if (img.parentNode) {
          img.parentNode.replaceChild(imagePlaceholder(content.altText), img);
        }
      });
      img.setAttribute("src", mediaUrl);
      bubble.appendChild(img);
    } else {
      bubble.appendChild(imagePlaceholder(content.altText));
    }
    if (content.text) {
      bubble.appendChild(el("div", {}, content.text));
    }
  }

  // A shared location as the thread shows it: its name and address, else its coordinates.
  function locationText(content) {
    var place = content.location || {};
    var parts = [place.name, place.address].filter(function (p) { return typeof p === "string" && p; });
    if (parts.length) {
      return parts.join("\n");
    }
    var at = content.coordinates || {};
    return "Location: " + at.lat + ", " + at.long;
  }

  // A field's answer in words (SunCo's textFallback line: "label: value").
  function answerValue(field) {
    if (typeof field.text === "string" && field.type !== "email" && field.type !== "select") {
      return field.text;
    }
    if (typeof field.email === "string" && field.type === "email") {
      return field.email;
    }
    return (Array.isArray(field.select) ? field.select : []).map(function (o) { return o && o.label; })
      .filter(Boolean).join(", ");
  }

  function formResponseText(content) {
    var fields = Array.isArray(content.fields) ? content.fields : [];
    if (!fields.length) {
      return content.textFallback || "[form response]";
    }
    return fields.map(function (f) { return (f && f.label) + ": " + answerValue(f || {}); }).join("\n");
  }

  // The form message a formResponse answers (every field names it).
  function answeredFormId(content) {
    var fields = Array.isArray(content.fields) ? content.fields : [];
    for (var i = 0; i < fields.length; i++) {
      if (fields[i] && typeof fields[i].quotedMessageId === "string" && fields[i].quotedMessageId) {
        return fields[i].quotedMessageId;
      }
    }
    return null;
  }

  // "Buy (12.50 EUR)"
  function buyLabel(action) {
    var label = action.text || "Buy";
    if (typeof action.amount !== "number" || !(action.amount > 0)) {
      return label;
    }
    var price = (action.amount / 100).toFixed(2) + (action.currency ? " " + String(action.currency).toUpperCase() : "");
    if (action.currency) {
      try {
        price = new Intl.NumberFormat(undefined, {style: "currency", currency: String(action.currency).toUpperCase()})
          .format(action.amount / 100);
      } catch (e) { /* an unknown currency code: the plain figure */ }
    }
    return label + " (" + price + ")";
  }

  // Actions a customer answers with a quick reply under the latest message (they go once it is
  // answered); the others are buttons in the bubble, and stay.
  function isQuickReply(action) {
    return !!action && (action.type === "reply" || action.type === "locationRequest");
  }

  // The pending bubble's text for an outbox item (a text, a tap's label, a location, a form answer).
  function itemText(item) {
    var media = item.image || item.file;
    if (media) {
      return media.altText || (item.image ? "image" : "file");
    }
    if (item.formResponse) {
      return formResponseText(item.formResponse);
    }
    if (item.location) {
      return locationText({coordinates: {lat: item.location.lat, long: item.location.long},
        location: {name: item.location.name, address: item.location.address}});
    }
    return item.text || "";
  }

  function itemType(item) {
    return item.formResponse ? "formResponse" : item.location ? "location" : item.image ? "image" :
      item.file ? "file" : "text";
  }

  // A message's content in its node: text, media, location, carousel, list, form, form answer,
  // and the business's buttons. DOM only (textContent, safeUrl for every URL), never HTML.
  Widget.prototype.renderContent = function (node, author, message) {
    var bubble = node.firstChild;
    var content = (message && message.content) || {};
    var type = typeof content.type === "string" ? content.type : "text";
    var business = author === "business";
    node.setAttribute("data-type", type);
    if (type === "image" && content.mediaUrl) {
      renderImage(bubble, content);
    } else if (type === "file" && content.mediaUrl) {
      var mediaUrl = safeUrl(content.mediaUrl);
      var label = content.altText || content.text || "file";
      // Not a web URL: the file's name as text, never a link.
      bubble.appendChild(mediaUrl ? el("a", {"href": mediaUrl, "target": "_blank", "rel": "noopener noreferrer"},
        label) : el("span", {"data-threadline": "file-unavailable"}, label));
    } else if (type === "location" && content.coordinates) {
      bubble.textContent = locationText(content);
    } else if (type === "carousel" && Array.isArray(content.items)) {
      bubble.appendChild(this.carouselView(content, message, business));
    } else if (type === "list" && Array.isArray(content.items)) {
      bubble.appendChild(this.listView(content, message, business));
    } else if (type === "form" && Array.isArray(content.fields)) {
      bubble.appendChild(this.formView(content, message, business));
    } else if (type === "formResponse") {
      bubble.textContent = formResponseText(content);
    } else {
      bubble.textContent = content.text || "[" + type + "]";
    }
    if (business && (type === "text" || type === "image") && Array.isArray(content.actions)) {
      var inBubble = content.actions.filter(function (a) { return a && !isQuickReply(a); });
      var quick = content.actions.filter(isQuickReply);
      if (inBubble.length) {
        bubble.appendChild(this.actionsView(inBubble, "actions"));
      }
      if (quick.length) {
        node.tlQuickReplies = quick;
      }
    }
    node.tlBlocksInput = business && content.blockChatInput === true;
  };

  // Buttons for `actions`: taps (postback, reply) post a message, links open a new tab, a
  // location request shares the browser's position. A link without a web URL is left out.
  Widget.prototype.actionsView = function (actions, hook) {
    var self = this;
    var box = el("div", {"class": "tl-actions", "data-threadline": hook, "role": "group"});
    actions.forEach(function (action) {
      var button = self.actionElement(action, false);
      if (button) {
        box.appendChild(button);
      }
    });
    return box;
  };

  Widget.prototype.actionElement = function (action, chip) {
    var self = this;
    if (!action || typeof action.type !== "string") {
      return null;
    }
    var cls = chip ? "tl-chip" : "tl-action";
    var hook = chip ? "quick-reply" : "action";
    var text = typeof action.text === "string" ? action.text : "";
    if (action.type === "link" || action.type === "webview" || action.type === "buy") {
      var uri = safeUrl(action.uri);
      if (!uri && action.type === "buy" && !chip) {
        // SunCo's buy button pays in its own checkout, which this widget does not have: without a
        // payment page (`uri`) it shows what is on offer, and does nothing.
        return el("span", {"class": cls, "data-threadline": hook, "data-action": "buy", "aria-disabled": "true"},
          buyLabel(action));
      }
      if (!uri) {
        return null;
      }
      return el("a", {"class": cls, "data-threadline": hook, "data-action": action.type, "href": uri,
        "target": "_blank", "rel": "noopener noreferrer"}, action.type === "buy" ? buyLabel(action) : text || uri);
    }
    if (action.type === "locationRequest") {
      var share = el("button", {"class": cls, "type": "button", "data-threadline": hook,
        "data-action": "locationRequest"}, text || "Share location");
      share.addEventListener("click", function () { self.shareLocation(share); });
      return share;
    }
    if ((action.type === "reply" || action.type === "postback") && text && typeof action.payload === "string" &&
        action.payload) {
      var button = el("button", {"class": cls, "type": "button", "data-threadline": hook,
        "data-action": action.type});
      var icon = action.type === "reply" && safeUrl(action.iconUrl);
      if (icon) {
        button.appendChild(el("img", {"class": "tl-chip-icon", "src": icon, "alt": ""}));
      }
      button.appendChild(document.createTextNode(text));
      button.addEventListener("click", function () { self.tap(action, button); });
      return button;
    }
    return null;
  };

  // One card or row: image, title, description, its buttons.
  Widget.prototype.itemView = function (item, kind) {
    var card = el("div", {"class": kind === "carousel" ? "tl-card" : "tl-list-item",
      "data-threadline": kind + "-item", "role": "group", "aria-label": String(item.title || "")});
    var mediaUrl = safeUrl(item.mediaUrl);
    if (mediaUrl) {
      var img = el("img", {"class": "tl-item-media", "alt": item.altText || "", "src": mediaUrl});
      img.addEventListener("error", function () {
        if (img.parentNode) {
          img.parentNode.removeChild(img);
        }
      });
      card.appendChild(img);
    }
    var body = el("div", {"class": "tl-item-body"});
    body.appendChild(el("div", {"class": "tl-item-title", "data-threadline": "item-title"}, String(item.title || "")));
    if (item.description) {
      body.appendChild(el("div", {"class": "tl-item-description", "data-threadline": "item-description"},
        String(item.description)));
    }
    if (Array.isArray(item.actions) && item.actions.length) {
      body.appendChild(this.actionsView(item.actions, "actions"));
    }
    card.appendChild(body);
    return card;
  };

  // A horizontally scrolling row of cards (scrollable by keyboard too).
  Widget.prototype.carouselView = function (content, message, business) {
    var self = this;
    var ratio = content.displaySettings && content.displaySettings.imageAspectRatio === "square" ? "square" :
      "horizontal";
    var row = el("div", {"class": "tl-carousel", "data-threadline": "carousel", "data-aspect": ratio,
      "role": "group", "aria-label": "Carousel", "tabindex": "0"});
    content.items.forEach(function (item) {
      if (item) {
        row.appendChild(self.itemView(item, "carousel"));
      }
    });
    return row;
  };

  // Items one under the other, then the list's own buttons.
  Widget.prototype.listView = function (content, message, business) {
    var self = this;
    var box = el("div", {"class": "tl-list", "data-threadline": "list", "role": "list"});
    content.items.forEach(function (item) {
      if (item) {
        var row = self.itemView(item, "list");
        row.setAttribute("role", "listitem");
        box.appendChild(row);
      }
    });
    if (Array.isArray(content.actions) && content.actions.length) {
      box.appendChild(this.actionsView(content.actions, "list-actions"));
    }
    return box;
  };

  var formCounter = 0;

  // Code points, as the server counts a text's length.
  function codePoints(text) {
    return Array.from(text).length;
  }

  var EMAIL = /^[^@\s]{1,64}@[^@\s]{1,255}$/;

  // An inline form: its submit sends the formResponse, then it shows as submitted with the answers.
  Widget.prototype.formView = function (content, message, business) {
    var self = this;
    formCounter += 1;
    var form = el("form", {"class": "tl-form", "data-threadline": "form", "data-state": "open", "novalidate": ""});
    var inputs = [];
    content.fields.forEach(function (field, index) {
      if (!field || typeof field.name !== "string") {
        return;
      }
      var id = "threadline-form-" + formCounter + "-" + index;
      var row = el("div", {"class": "tl-form-field", "data-threadline": "form-field", "data-name": field.name,
        "data-type": field.type});
      row.appendChild(el("label", {"for": id}, String(field.label || field.name)));
      var input;
      if (field.type === "select") {
        input = el("select", {"id": id, "class": "tl-form-input", "required": ""});
        input.appendChild(el("option", {"value": ""}, field.placeholder || "Choose\u2026"));
        (Array.isArray(field.options) ? field.options : []).forEach(function (option, i) {
          if (option && typeof option.name === "string") {
            input.appendChild(el("option", {"value": String(i)}, String(option.label || option.name)));
          }
        });
      } else {
        var low = field.type === "text" ? field.minSize || 1 : 1;
        var high = field.type === "text" ? field.maxSize || 128 : 128;
        input = el("input", {"id": id, "class": "tl-form-input", "type": field.type === "email" ? "email" : "text",
          "required": "", "autocomplete": field.type === "email" ? "email" : "off",
          "minlength": String(low), "maxlength": String(high), "placeholder": field.placeholder || ""});
      }
      row.appendChild(input);
      form.appendChild(row);
      inputs.push({field: field, input: input});
    });
    var error = el("div", {"class": "tl-form-error", "data-threadline": "form-error", "role": "alert", "hidden": ""});
    var submit = el("button", {"class": "tl-action tl-form-submit", "type": "submit",
      "data-threadline": "form-submit"}, "Submit");
    form.appendChild(error);
    form.appendChild(submit);
    form.tlInputs = inputs;
    form.tlSubmit = submit;
    if (!business) {
      this.setFormState(form, "submitted", null);
      return form;
    }
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      if (form.getAttribute("data-state") !== "open") {
        return;
      }
      var answers = [];
      for (var i = 0; i < inputs.length; i++) {
        var problem = self.formAnswer(inputs[i], answers);
        if (problem) {
          error.textContent = problem;
          error.removeAttribute("hidden");
          inputs[i].input.focus();
          return;
        }
      }
      error.setAttribute("hidden", "");
      error.textContent = "";
      self.setFormState(form, "submitted", answers);
      var id = self.send("", {formResponse: {quotedMessageId: message.id, fields: answers}});
      self.itemForms[id] = form;
    });
    this.forms[message.id] = form;
    var known = this.formAnswers[message.id];
    if (known) {
      this.setFormState(form, "submitted", known);
    } else if (content.submitted === true) {
      this.setFormState(form, "submitted", null);
    }
    return form;
  };

  // Adds the answer of one field to `answers`; a sentence saying what is wrong, else null.
  Widget.prototype.formAnswer = function (entry, answers) {
    var field = entry.field;
    var label = String(field.label || field.name);
    var base = {type: field.type, name: field.name, label: label};
    if (field.type === "select") {
      var options = Array.isArray(field.options) ? field.options : [];
      var chosen = options[parseInt(entry.input.value, 10)];
      if (!entry.input.value || !chosen) {
        return "Please choose " + label + ".";
      }
      base.select = [{name: chosen.name, label: String(chosen.label || chosen.name)}];
    } else if (field.type === "email") {
      var email = entry.input.value.trim();
      if (!EMAIL.test(email) || codePoints(email) > 128) {
        return label + ": please enter an e-mail address.";
      }
      base.email = email;
    } else {
      var text = entry.input.value.trim();
      var low = field.minSize || 1;
      var high = Math.min(field.maxSize || 128, 256);
      var size = codePoints(text);
      if (size < low || size > high) {
        return label + (low > 1 ? ": please enter " + low + " to " + high + " characters." :
          size < low ? ": please fill this in." : ": at most " + high + " characters, please.");
      }
      base.text = text;
    }
    answers.push(base);
    return null;
  };

  // open (editable), or submitted (disabled, showing `answers` when known).
  Widget.prototype.setFormState = function (form, state, answers) {
    form.setAttribute("data-state", state);
    var open = state === "open";
    var byName = {};
    (answers || []).forEach(function (a) {
      if (a && typeof a.name === "string") {
        byName[a.name] = a;
      }
    });
    (form.tlInputs || []).forEach(function (entry) {
      entry.input.disabled = !open;
      var answer = byName[entry.field.name];
      if (!answer) {
        return;
      }
      if (entry.field.type === "select") {
        var picked = (answer.select || [])[0];
        var options = Array.isArray(entry.field.options) ? entry.field.options : [];
        var index = -1;
        for (var i = 0; i < options.length; i++) {
          if (options[i] && picked && options[i].name === picked.name) {
            index = i;
          }
        }
        if (index >= 0) {
          entry.input.value = String(index);
        }
      } else {
        entry.input.value = answerValue(answer);
      }
    });
    form.tlSubmit.disabled = !open;
    form.tlSubmit.textContent = open ? "Submit" : "Submitted";
    this.updateLatest();
  };

  // A customer's formResponse (from history, or ours confirmed): its form shows as submitted.
  Widget.prototype.noteFormAnswer = function (content) {
    var formId = answeredFormId(content || {});
    if (!formId) {
      return;
    }
    this.formAnswers[formId] = content.fields;
    var form = this.forms[formId];
    if (form) {
      this.setFormState(form, "submitted", content.fields);
    }
  };

  // The customer tapped a reply or postback button: the label as text, with the button's payload.
  // A reply comes back as the customer's message; a postback is announced to the business only
  // (`conversation:postback`), so it leaves no bubble and the button stays.
  Widget.prototype.tap = function (action, button) {
    if (action.type === "reply") {
      this.send(action.text, {payload: action.payload});
      return;
    }
    if (button.getAttribute("aria-busy") === "true") {
      return;
    }
    button.setAttribute("aria-busy", "true");
    button.setAttribute("data-state", "sending");
    var id = this.send(action.text, {payload: action.payload, silent: true});
    this.tapButtons[id] = button;
  };

  // A postback tap reached the server (or was refused).
  Widget.prototype.tapDone = function (item, ok) {
    var button = this.tapButtons[item.id];
    delete this.tapButtons[item.id];
    if (button) {
      button.removeAttribute("aria-busy");
      button.setAttribute("data-state", ok ? "sent" : "failed");
    }
  };

  // "Share location": the browser's position as a location message. Refused or unavailable:
  // say so; the customer can still type an address.
  Widget.prototype.shareLocation = function (button) {
    var self = this;
    var geo = navigator.geolocation;
    if (!geo || typeof geo.getCurrentPosition !== "function") {
      this.locationNotice("Location sharing isn't available in this browser. You can type your address instead.");
      return;
    }
    if (button.disabled) {
      return;
    }
    var label = button.textContent;
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    geo.getCurrentPosition(function (position) {
      button.disabled = false;
      button.removeAttribute("aria-busy");
      var coords = position && position.coords;
      if (!coords || !isFinite(coords.latitude) || !isFinite(coords.longitude)) {
        self.locationNotice("We couldn't get your location. You can type your address instead.");
        return;
      }
      self.send("", {location: {lat: coords.latitude, long: coords.longitude}});
    }, function (error) {
      button.disabled = false;
      button.removeAttribute("aria-busy");
      button.textContent = label;
      self.locationNotice(error && error.code === 1 ?
        "Location sharing is turned off for this site. You can type your address instead." :
        "We couldn't get your location. You can type your address instead.");
    }, {enableHighAccuracy: false, timeout: 20000, maximumAge: 60000});
  };

  Widget.prototype.locationNotice = function (text) {
    var old = this.list.querySelector('[data-threadline="location-error"]');
    if (old) {
      old.parentNode.removeChild(old);
    }
    this.list.appendChild(el("div", {"class": "tl-system", "data-threadline": "location-error", "data-kind": "failed",
      "role": "alert"}, text));
    this.scrollToEnd();
    this.input.focus();
  };

  // After any change to the thread: quick replies under the latest message when it is the
  // business's (gone once anything follows it), and the input blocked while the latest message
  // asks for it (`blockChatInput`; a form until it is submitted).
  Widget.prototype.updateLatest = function () {
    var nodes = this.list.querySelectorAll('[data-threadline="message"]');
    var last = nodes.length ? nodes[nodes.length - 1] : null;
    var business = !!last && last.getAttribute("data-author") === "business";
    var shown = this.list.querySelector('[data-threadline="quick-replies"]');
    var wanted = business && last.tlQuickReplies ? last : null;
    if (shown && shown.tlFor !== wanted) {
      shown.parentNode.removeChild(shown);
      shown = null;
    }
    if (wanted && !shown) {
      var self = this;
      shown = el("div", {"class": "tl-replies", "data-threadline": "quick-replies", "role": "group",
        "aria-label": "Quick replies"});
      shown.tlFor = wanted;
      wanted.tlQuickReplies.forEach(function (action) {
        var chip = self.actionElement(action, true);
        if (chip) {
          shown.appendChild(chip);
        }
      });
      this.list.insertBefore(shown, wanted.nextSibling);
    }
    var form = business ? last.querySelector('[data-threadline="form"]') : null;
    var blocked = business && last.tlBlocksInput === true &&
      !(form && form.getAttribute("data-state") === "submitted");
    this.input.disabled = blocked;
    this.sendButton.disabled = blocked;
    this.attachButton.disabled = blocked;
    this.input.setAttribute("placeholder", blocked ? "Please answer above\u2026" : "Type a message\u2026");
  };

  Widget.prototype.messageElement = function (author, status) {
    var node = el("div", {"class": "tl-message", "data-threadline": "message", "data-author": author,
      "data-status": status});
    node.appendChild(el("div", {"class": "tl-bubble"}));
    node.appendChild(el("div", {"class": "tl-meta", "data-threadline": "meta", "data-label": ""}));
    return node;
  };

  // Under the bubble: the business author's display name (when sent) and the time received.
  function setMeta(node, author, message) {
    var meta = node.querySelector('[data-threadline="meta"]');
    if (!meta) {
      return;
    }
    var parts = [];
    var name = author === "business" && message.author && message.author.displayName;
    if (typeof name === "string" && name) {
      parts.push(name);
    }
    var time = formatTime(Date.parse(message.received) || 0);
    if (time) {
      parts.push(time);
    }
    var label = parts.join(" \u00B7 ");
    meta.setAttribute("data-label", label);
    meta.setAttribute("title", message.received || "");
    if (label) {
      meta.setAttribute("aria-label", label);
    }
  }

  // Insert a confirmed message in cursor order, before any still-pending message or upload.
  Widget.prototype.insertByCursor = function (node, cursor) {
    var children = this.list.children;
    for (var i = 0; i < children.length; i++) {
      var child = children[i];
      var hook = child.getAttribute("data-threadline");
      if (hook === "upload") {
        // A file still uploading stays last, with the messages still pending.
        this.list.insertBefore(node, child);
        return;
      }
      if (hook !== "message") {
        continue;
      }
      var childCursor = child.getAttribute("data-cursor");
      if (childCursor === null || parseInt(childCursor, 10) > cursor) {
        this.list.insertBefore(node, child);
        return;
      }
    }
    this.list.appendChild(node);
  };

  Widget.prototype.onMessage = function (cursor, message) {
    if (this.lastCursor === null || cursor > this.lastCursor) {
      this.lastCursor = cursor;
    }
    if (!message || this.rendered[message.id]) {
      return;
    }
    var author = message.author && message.author.type === "business" ? "business" : "user";
    var clientMessageId = message.source && message.source.originalMessageId;
    var node = author === "user" && clientMessageId ? this.pending[clientMessageId] : null;
    if (node) {
      // Our own message came back: it is stored, confirm it where it stands.
      delete this.pending[clientMessageId];
      delete this.itemForms[clientMessageId];
      this.dropFromOutbox(clientMessageId);
      this.list.removeChild(node);
      node.setAttribute("data-status", "confirmed");
      var sentType = message.content && message.content.type;
      if (sentType === "image" || sentType === "file") {
        // Its file is served once the message is stored: now it shows like any other.
        node.firstChild.textContent = "";
        this.renderContent(node, author, message);
        if (node.tlPreview) {
          URL.revokeObjectURL(node.tlPreview);
          node.tlPreview = null;
        }
      }
    } else {
      node = this.messageElement(author, author === "user" ? "confirmed" : "received");
      this.renderContent(node, author, message);
      if (clientMessageId) {
        node.setAttribute("data-client-message-id", clientMessageId);
      }
    }
    node.setAttribute("data-message-id", message.id);
    node.setAttribute("data-cursor", String(cursor));
    node.setAttribute("data-received", String(Date.parse(message.received) || 0));
    setMeta(node, author, message);
    this.insertByCursor(node, cursor);
    this.rendered[message.id] = node;
    if (author === "user" && message.content && message.content.type === "formResponse") {
      this.noteFormAnswer(message.content);
    }
    this.updateLatest();
    if (author === "business") {
      this.showBusinessTyping(false);
      if (cursor > this.latestBusinessCursor) {
        this.latestBusinessCursor = cursor;
      }
      if (cursor > this.readCursor && !this.isReading()) {
        this.bumpUnread();
      }
      this.maybeSendRead();
    }
    this.updateSeen();
    this.scrollToEnd();
  };

  Widget.prototype.updateSeen = function () {
    var nodes = this.list.querySelectorAll('[data-threadline="message"][data-author="user"]');
    var last = nodes.length ? nodes[nodes.length - 1] : null;
    var seen = this.list.querySelector('[data-threadline="seen"]');
    var show = last && last.getAttribute("data-status") === "confirmed" && this.businessReadAt > 0 &&
      this.businessReadAt >= parseInt(last.getAttribute("data-received") || "0", 10);
    if (!show) {
      if (seen) {
        seen.parentNode.removeChild(seen);
      }
      return;
    }
    if (!seen) {
      seen = el("div", {"class": "tl-seen", "data-threadline": "seen"}, "Seen");
    }
    if (last.nextSibling !== seen) {
      this.list.insertBefore(seen, last.nextSibling);
    }
  };

  Widget.prototype.showBusinessTyping = function (active) {
    var self = this;
    clearTimeout(this.businessTypingTimer);
    if (active) {
      this.typing.removeAttribute("hidden");
      // A lost typing:stop must not leave the indicator on forever.
      this.businessTypingTimer = setTimeout(function () { self.showBusinessTyping(false); },
        BUSINESS_TYPING_TIMEOUT_MS);
    } else {
      this.typing.setAttribute("hidden", "");
    }
  };

  // --- continue on another channel (the handoff) ----------------------------------------------

  Widget.prototype.loadChannels = function () {
    var self = this;
    return fetch(this.apiUrl("/integrations/" + encodeURIComponent(this.integrationId) + "/channels"),
      {credentials: "omit", mode: "cors"})
      .then(function (res) { return res.ok ? res.json() : null; })
      .then(function (body) {
        if (body && Array.isArray(body.channels)) {
          self.channels = body.channels.filter(function (c) { return c && c.integrationId && c.type; });
          self.onNotifyChannels(body.notificationChannels);
          self.updateStartedUi();
        }
      })
      .catch(function () { /* no button then; the chat works without it */ });
  };

  // A channel's button label; two of one kind (an Android and an iOS app) are told apart by name.
  Widget.prototype.optionLabel = function (channel) {
    var name = capitalize(channelName(channel.type));
    var twins = (this.channels || []).filter(function (c) {
      return channelName(c.type) === channelName(channel.type);
    });
    return twins.length > 1 ? name + " (" + (channel.displayName || channel.type) + ")" : name;
  };

  Widget.prototype.channelType = function (integrationId, clientType) {
    var found = (this.channels || []).filter(function (c) { return c.integrationId === integrationId; })[0];
    return found ? found.type : clientType;
  };

  Widget.prototype.toggleHandoff = function () {
    if (this.handoff.hidden) {
      this.showChannels();
    } else {
      this.hideHandoff();
    }
  };

  Widget.prototype.hideHandoff = function () {
    this.handoffRequest = null;
    this.handoff.setAttribute("hidden", "");
    this.handoff.textContent = "";
    this.continueButton.setAttribute("aria-expanded", "false");
  };

  Widget.prototype.handoffFrame = function (title) {
    this.handoff.textContent = "";
    this.handoff.removeAttribute("hidden");
    this.continueButton.setAttribute("aria-expanded", "true");
    this.handoff.appendChild(el("div", {"class": "tl-handoff-title", "data-threadline": "handoff-title"}, title));
  };

  Widget.prototype.handoffButton = function (label, onClick) {
    var button = el("button", {"class": "tl-linkish", "type": "button"}, label);
    button.addEventListener("click", onClick);
    this.handoff.appendChild(button);
    return button;
  };

  Widget.prototype.showChannels = function () {
    var self = this;
    this.handoffRequest = null;
    this.handoffFrame("Continue this conversation on\u2026");
    var channels = this.channels || [];
    if (!channels.length) {
      this.handoff.appendChild(el("div", {"class": "tl-hint"}, "No other channel is available right now."));
    }
    var options = el("div", {"class": "tl-handoff-options", "role": "group", "aria-label": "Channels"});
    channels.forEach(function (channel) {
      var label = self.optionLabel(channel);
      var option = el("button", {"class": "tl-option", "type": "button",
        "data-threadline": "continue-option", "data-type": channel.type,
        "data-integration-id": channel.integrationId, "aria-label": "Continue on " + label}, label);
      option.addEventListener("click", function () { self.requestLink(channel); });
      options.appendChild(option);
    });
    this.handoff.appendChild(options);
    this.handoffButton("Cancel", function () { self.hideHandoff(); self.input.focus(); });
    var first = options.querySelector("button");
    if (first) {
      first.focus();
    }
  };

  Widget.prototype.requestLink = function (channel) {
    var self = this;
    var name = channelName(channel.type);
    var request = {};
    this.handoffRequest = request;
    this.handoffFrame("Continue on " + name);
    this.handoff.appendChild(el("div", {"class": "tl-hint", "role": "status"}, "Getting your link\u2026"));
    this.ensureStarted().then(function (session) {
      return self.request("POST", "/conversations/" + encodeURIComponent(session.conversationId) +
        "/linkRequests", {integrationIds: [channel.integrationId]});
    }).then(function (res) {
      return res.json().catch(function () { return {}; }).then(function (body) {
        if (!res.ok) {
          if (res.status === 401) {
            self.sessionRefused();
          }
          var title = body && body.errors && body.errors[0] && body.errors[0].title;
          throw new Error(title || "HTTP " + res.status);
        }
        return body;
      });
    }).then(function (body) {
      var link = body && body.linkRequests && body.linkRequests[0];
      if (!link || !safeUrl(link.url, LINK_SCHEMES)) {
        throw new Error("no usable link");
      }
      if (self.handoffRequest === request) {
        self.showLink(channel, link);
      }
    }).catch(function () {
      if (self.handoffRequest !== request) {
        return;
      }
      self.handoffFrame("Continue on " + name);
      self.handoff.appendChild(el("div", {"class": "tl-handoff-error", "data-threadline": "handoff-error",
        "role": "alert"}, "We couldn't get a link to " + name + ". Please try again."));
      self.handoffButton("Try again", function () { self.requestLink(channel); });
      self.handoffButton("Other channels", function () { self.showChannels(); });
    });
  };

  Widget.prototype.showLink = function (channel, link) {
    var self = this;
    var name = channelName(channel.type);
    this.handoffFrame("Continue on " + name);
    this.handoff.appendChild(el("div", {"class": "tl-hint"}, CHANNEL_STEPS[channel.type] || ""));
    // A plain link: it opens the channel's app (or a new tab), and a host page may intercept the
    // click (the sandbox hands it to its simulated phone).
    var anchor = el("a", {"class": "tl-link", "data-threadline": "continue-link",
      "href": safeUrl(link.url, LINK_SCHEMES),
      "target": "_blank", "rel": "noopener noreferrer", "data-type": channel.type},
      "Open " + name);
    this.handoff.appendChild(anchor);
    var qrCodeUrl = safeUrl(link.qrCodeUrl);
    if (isDesktop() && qrCodeUrl) {
      this.handoff.appendChild(el("div", {"class": "tl-hint"}, "Or scan this code with your phone's camera:"));
      this.handoff.appendChild(el("img", {"class": "tl-qr", "data-threadline": "continue-qr", "src": qrCodeUrl,
        "width": "144", "height": "144",
        "alt": "QR code that opens " + name + " on your phone to continue this conversation"}));
    }
    var expires = formatTime(Date.parse(link.expiresAt) || 0);
    this.handoff.appendChild(el("div", {"class": "tl-hint", "data-threadline": "continue-expiry"},
      "The link works once" + (expires ? " and expires at " + expires : "") + "."));
    this.handoffButton("Other channels", function () { self.showChannels(); });
    anchor.focus();
  };

  // A line in the thread that is not a message (the conversation moved, a move failed).
  Widget.prototype.addSystemLine = function (kind, text) {
    var line = el("div", {"class": "tl-system", "data-threadline": "system", "data-kind": kind,
      "role": kind === "failed" ? "alert" : "status"}, text);
    this.list.appendChild(line);
    this.scrollToEnd();
    if (!this.isReading()) {
      this.bumpUnread();
    }
  };

  Widget.prototype.onChannelFrame = function (frame) {
    if (frame.status === "moved" && frame.integrationId === this.integrationId) {
      return;  // another browser joined through a web link: the conversation did not leave the web
    }
    var name = channelName(this.channelType(frame.integrationId, frame.clientType));
    if (frame.status === "moved") {
      this.hideHandoff();
      this.addSystemLine("moved", "Conversation moved to " + name + " \u2014 reply there");
    } else if (frame.status === "failed") {
      this.addSystemLine("failed", frame.message || "We couldn't continue this conversation on " + name + ".");
    }
  };

  // --- "Notify me" (notification opt-in) ------------------------------------------------------
  // The customer leaves an e-mail address or a phone number, types back the code sent there, and
  // is told there when the business replies while they are away (the `notifications` service
  // decides when). Everything of this feature lives in this section.

  var NOTIFY_CSS = [
    ".tl-notify-button{background:rgba(255,255,255,.16);border:1px solid rgba(255,255,255,.65);color:#fff;",
    "border-radius:999px;width:26px;height:24px;padding:0;display:flex;align-items:center;justify-content:center;",
    "cursor:pointer;flex:none}",
    ".tl-notify-button[data-active=true]{background:#fff;color:var(--tl-brand,#2b59c3)}",
    ".tl-notify-button[hidden],.tl-notify[hidden]{display:none}",
    ".tl-notify{display:flex;flex-direction:column;gap:8px;padding:10px 12px;background:#fff;",
    "border-bottom:1px solid #d0d7de;max-height:65%;overflow-y:auto}",
    ".tl-notify-form{display:flex;flex-direction:column;gap:4px}",
    ".tl-notify-row{display:flex;gap:6px}",
    ".tl-notify-form label{font-size:12px;color:#656d76}",
    ".tl-notify-input{flex:1;min-width:0;border:1px solid #d0d7de;border-radius:8px;padding:6px 8px;font:inherit}",
    ".tl-notify-submit{border:0;border-radius:8px;background:var(--tl-brand,#2b59c3);color:#fff;padding:0 12px;",
    "cursor:pointer;font:inherit}",
    ".tl-notify-submit[disabled]{opacity:.6;cursor:default}",
    ".tl-notify-done{font-weight:600}"
  ].join("");
  // How "Notify me" names a channel, and what it asks for.
  var NOTIFY_NAMES = {email: "e-mail", twilio: "SMS", whatsapp: "WhatsApp"};
  var NOTIFY_ADDRESS = {
    email: {label: "Your e-mail address", type: "email", autocomplete: "email", placeholder: "you@example.com"},
    twilio: {label: "Your mobile number, with country code", type: "tel", autocomplete: "tel",
      placeholder: "+15551234567"},
    whatsapp: {label: "Your WhatsApp number, with country code", type: "tel", autocomplete: "tel",
      placeholder: "+15551234567"}
  };
  var BELL_ICON = '<svg width="14" height="14" viewBox="0 0 24 24" aria-hidden="true"><path fill="currentColor" ' +
    'd="M12 22a2.5 2.5 0 0 0 2.5-2.5h-5A2.5 2.5 0 0 0 12 22zm7-6V11a7 7 0 0 0-5.5-6.8V3a1.5 1.5 0 0 0-3 0v1.2A7 ' +
    '7 0 0 0 5 11v5l-2 2v1h18v-1z"/></svg>';

  function notifyName(type) {
    return NOTIFY_NAMES[type] || type;
  }

  // "e-mail, SMS or WhatsApp"
  function listOfNames(types) {
    var names = types.map(notifyName);
    return names.length > 1 ? names.slice(0, -1).join(", ") + " or " + names[names.length - 1] : names.join("");
  }

  // Called once from render(): the header's bell button and the panel under the header.
  Widget.prototype.renderNotify = function () {
    var self = this;
    if (!document.getElementById("threadline-notify-css")) {
      var style = document.createElement("style");
      style.id = "threadline-notify-css";
      style.textContent = NOTIFY_CSS;
      (document.head || document.documentElement).appendChild(style);
    }
    this.notifyChannels = [];
    this.notifyView = null;   // token of the view shown; answers for an older view are dropped
    this.notifyButton = el("button", {"class": "tl-notify-button", "data-threadline": "notify-button",
      "type": "button", "aria-expanded": "false", "aria-controls": "threadline-notify", "hidden": "",
      "aria-label": "Notify me when you reply", "title": "Notify me when you reply"});
    this.notifyButton.innerHTML = BELL_ICON;
    this.notifyPanel = el("div", {"class": "tl-notify", "id": "threadline-notify", "data-threadline": "notify",
      "role": "region", "aria-label": "Notify me when you reply", "hidden": ""});
    this.continueButton.parentNode.insertBefore(this.notifyButton, this.continueButton);
    this.handoff.parentNode.insertBefore(this.notifyPanel, this.handoff.nextSibling);
    this.notifyButton.addEventListener("click", function () { self.toggleNotify(); });
    this.notifyPanel.addEventListener("keydown", function (event) {
      if (event.key === "Escape") {
        self.hideNotify();
        self.notifyButton.focus();
      }
    });
  };

  // From the /channels answer: where this app can notify (none: no bell).
  Widget.prototype.onNotifyChannels = function (channels) {
    this.notifyChannels = (Array.isArray(channels) ? channels : []).filter(function (c) {
      return c && c.integrationId && NOTIFY_ADDRESS[c.type];
    });
    var label = "Notify me by " + listOfNames(this.notifyChannels.map(function (c) { return c.type; })) +
      " when you reply";
    this.notifyButton.setAttribute("aria-label", label);
    this.notifyButton.setAttribute("title", label);
    this.updateStartedUi();
  };

  Widget.prototype.toggleNotify = function () {
    if (this.notifyPanel.hidden) {
      this.showNotify();
    } else {
      this.hideNotify();
    }
  };

  Widget.prototype.hideNotify = function () {
    this.notifyView = null;
    this.notifyPanel.setAttribute("hidden", "");
    this.notifyPanel.textContent = "";
    this.notifyButton.setAttribute("aria-expanded", "false");
  };

  // A fresh view in the panel; returns its token.
  Widget.prototype.notifyFrame = function (title) {
    if (this.handoff && !this.handoff.hidden) {
      this.hideHandoff();
    }
    this.notifyView = {};
    this.notifyPanel.textContent = "";
    this.notifyPanel.removeAttribute("hidden");
    this.notifyButton.setAttribute("aria-expanded", "true");
    this.notifyPanel.appendChild(el("div", {"class": "tl-handoff-title", "data-threadline": "notify-title"}, title));
    return this.notifyView;
  };

  Widget.prototype.notifyLink = function (label, hook, onClick) {
    var button = el("button", {"class": "tl-linkish", "type": "button", "data-threadline": hook}, label);
    button.addEventListener("click", onClick);
    this.notifyPanel.appendChild(button);
    return button;
  };

  Widget.prototype.notifyError = function (view, text) {
    if (this.notifyView !== view) {
      return;
    }
    var old = this.notifyPanel.querySelector("[data-threadline=notify-error]");
    if (old) {
      old.parentNode.removeChild(old);
    }
    this.notifyPanel.appendChild(el("div", {"class": "tl-handoff-error", "data-threadline": "notify-error",
      "role": "alert"}, text));
  };

  // An opt-in call with the session (created on first use); rejects with the server's message.
  Widget.prototype.notifyCall = function (method, path, body) {
    var self = this;
    return this.ensureStarted().then(function (session) {
      return self.request(method, "/conversations/" + encodeURIComponent(session.conversationId) +
        "/notificationOptIns" + path, body);
    }).then(function (res) {
      return res.json().catch(function () { return {}; }).then(function (data) {
        if (!res.ok) {
          if (res.status === 401) {
            self.sessionRefused();
          }
          var title = data && data.errors && data.errors[0] && data.errors[0].title;
          var text = title || "Something went wrong (" + res.status + "). Please try again.";
          if (res.status === 429) {
            text = (title || "Too many requests") + ". " + retryText(res.headers.get("Retry-After"));
          }
          var error = new Error(text);
          error.status = res.status;
          throw error;
        }
        return data;
      });
    });
  };

  // A 429's Retry-After (seconds) in words: "Try again in 12 minutes."
  function retryText(header) {
    var seconds = parseInt(header, 10);
    if (!(seconds > 0)) {
      return "Please try again later.";
    }
    if (seconds < 60) {
      return "Try again in a minute.";
    }
    var minutes = Math.ceil(seconds / 60);
    if (minutes < 120) {
      return "Try again in " + minutes + " minutes.";
    }
    return "Try again in " + Math.ceil(minutes / 60) + " hours.";
  }

  // A small labelled form: [label] [input] [button]; `onSubmit(value, submitButton)`.
  Widget.prototype.notifyForm = function (spec, onSubmit) {
    var id = "threadline-notify-" + spec.hook;
    var form = el("form", {"class": "tl-notify-form", "data-threadline": "notify-form", "novalidate": ""});
    form.appendChild(el("label", {"for": id}, spec.label));
    var row = el("div", {"class": "tl-notify-row"});
    var input = el("input", {"class": "tl-notify-input", "id": id, "data-threadline": spec.hook,
      "type": spec.type || "text", "autocomplete": spec.autocomplete || "off", "required": "",
      "placeholder": spec.placeholder || "", "maxlength": String(spec.maxlength || 254)});
    if (spec.inputmode) {
      input.setAttribute("inputmode", spec.inputmode);
    }
    var submit = el("button", {"class": "tl-notify-submit", "type": "submit",
      "data-threadline": spec.hook + "-submit"}, spec.submit);
    row.appendChild(input);
    row.appendChild(submit);
    form.appendChild(row);
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var value = input.value.trim();
      if (!value) {
        input.focus();
        return;
      }
      onSubmit(value, submit);
    });
    this.notifyPanel.appendChild(form);
    input.focus();
    return input;
  };

  // First view: the opt-ins already confirmed (with Stop), then the channels to choose from.
  Widget.prototype.showNotify = function () {
    var self = this;
    var view = this.notifyFrame("Notify me when you reply");
    this.notifyPanel.appendChild(el("div", {"class": "tl-hint"},
      "If you're away when we answer, we'll let you know by " +
      listOfNames(this.notifyChannels.map(function (c) { return c.type; })) + "."));
    var confirmedList = el("div", {"class": "tl-notify-current", "data-threadline": "notify-current"});
    this.notifyPanel.appendChild(confirmedList);
    var options = el("div", {"class": "tl-handoff-options", "role": "group", "aria-label": "Notify me by"});
    this.notifyChannels.forEach(function (channel) {
      var label = "By " + notifyName(channel.type);
      var option = el("button", {"class": "tl-option", "type": "button", "data-threadline": "notify-option",
        "data-type": channel.type, "data-integration-id": channel.integrationId,
        "aria-label": "Notify me by " + notifyName(channel.type)}, label);
      option.addEventListener("click", function () { self.askNotifyAddress(channel); });
      options.appendChild(option);
    });
    this.notifyPanel.appendChild(options);
    this.notifyLink("Close", "notify-close", function () { self.hideNotify(); self.input.focus(); });
    var first = options.querySelector("button");
    if (first) {
      first.focus();
    }
    if (this.started()) {
      this.notifyCall("GET", "").then(function (data) {
        if (self.notifyView !== view) {
          return;
        }
        var confirmed = (data.optIns || []).filter(function (o) { return o && o.status === "confirmed"; });
        self.notifyButton.setAttribute("data-active", confirmed.length ? "true" : "false");
        confirmed.forEach(function (optIn) {
          var line = el("div", {"class": "tl-hint", "data-threadline": "notify-status"},
            "You'll be notified at " + optIn.maskedAddress + " (" + notifyName(optIn.channel) + "). ");
          var stop = el("button", {"class": "tl-linkish", "type": "button", "data-threadline": "notify-stop",
            "aria-label": "Stop notifications at " + optIn.maskedAddress}, "Stop");
          stop.addEventListener("click", function () { self.stopNotify(optIn); });
          line.appendChild(stop);
          confirmedList.appendChild(line);
        });
      }).catch(function () { /* the list is a convenience; choosing a channel still works */ });
    }
  };

  Widget.prototype.askNotifyAddress = function (channel) {
    var self = this;
    var view = this.notifyFrame("Notify me by " + notifyName(channel.type));
    var spec = NOTIFY_ADDRESS[channel.type];
    this.notifyForm({hook: "notify-address", label: spec.label, type: spec.type, autocomplete: spec.autocomplete,
      placeholder: spec.placeholder, submit: "Send code"}, function (address, submit) {
      submit.disabled = true;
      self.notifyCall("POST", "", {channel: channel.type, address: address, integrationId: channel.integrationId})
        .then(function (data) {
          if (self.notifyView === view) {
            self.askNotifyCode(channel, data.optIn);
          }
        }).catch(function (error) {
          submit.disabled = false;
          self.notifyError(view, error.message);
        });
    });
    this.notifyLink("Back", "notify-back", function () { self.showNotify(); });
  };

  Widget.prototype.askNotifyCode = function (channel, optIn) {
    var self = this;
    var view = this.notifyFrame("Notify me by " + notifyName(channel.type));
    this.notifyPanel.appendChild(el("div", {"class": "tl-hint", "role": "status", "data-threadline": "notify-sent"},
      "We sent a code to " + optIn.maskedAddress + ". Type it here to confirm."));
    this.notifyForm({hook: "notify-code", label: "Code", autocomplete: "one-time-code", inputmode: "numeric",
      maxlength: 12, submit: "Confirm"}, function (code, submit) {
      submit.disabled = true;
      self.notifyCall("POST", "/" + encodeURIComponent(optIn.id) + "/confirm", {code: code}).then(function (data) {
        if (self.notifyView === view) {
          self.showNotifyDone(data.optIn);
        }
      }).catch(function (error) {
        submit.disabled = false;
        self.notifyError(view, error.message);
      });
    });
    this.notifyLink("Send a new code", "notify-resend", function () { self.askNotifyAddress(channel); });
    this.notifyLink("Cancel", "notify-cancel", function () { self.hideNotify(); self.input.focus(); });
  };

  Widget.prototype.showNotifyDone = function (optIn) {
    var self = this;
    this.notifyFrame("Notify me when you reply");
    this.notifyButton.setAttribute("data-active", "true");
    this.notifyPanel.appendChild(el("div", {"class": "tl-notify-done", "role": "status",
      "data-threadline": "notify-done"}, "You'll be notified at " + optIn.maskedAddress + " when we reply."));
    var stop = this.notifyLink("Stop", "notify-stop", function () { self.stopNotify(optIn); });
    stop.setAttribute("aria-label", "Stop notifications at " + optIn.maskedAddress);
    this.notifyLink("Close", "notify-close", function () { self.hideNotify(); self.input.focus(); });
    stop.focus();
  };

  Widget.prototype.stopNotify = function (optIn) {
    var self = this;
    var view = this.notifyView;
    this.notifyCall("DELETE", "/" + encodeURIComponent(optIn.id)).then(function () {
      var next = self.notifyFrame("Notify me when you reply");
      self.notifyButton.setAttribute("data-active", "false");
      self.notifyPanel.appendChild(el("div", {"class": "tl-hint", "role": "status",
        "data-threadline": "notify-stopped"}, "You won't be notified at " + optIn.maskedAddress + " any more."));
      self.notifyLink("Notify me elsewhere", "notify-again", function () { self.showNotify(); });
      self.notifyLink("Close", "notify-close", function () { self.hideNotify(); self.input.focus(); });
      return next;
    }).catch(function (error) {
      self.notifyError(view, error.message);
    });
  };

  // --- session --------------------------------------------------------------------------------
  // A session starts pending: a token and nothing else, so opening the widget creates nobody.
  // The first message (POST …/conversations) creates the visitor's user and conversation and
  // answers with the session's new tokens. The session token expires (`expiresAt`); the refresh
  // token gets a new pair, before expiry or after a 401, without the visitor noticing.

  Widget.prototype.persist = function () {
    this.state.session = this.session;
    this.state.readCursor = this.readCursor;
    save(this.storageKey, this.session ? this.state : null);
  };

  // Whether the session's conversation exists (its first message was accepted).
  Widget.prototype.started = function () {
    return !!(this.session && this.session.conversationId);
  };

  Widget.prototype.ensureSession = function () {
    var self = this;
    if (this.linkPromise) {
      // A link code is being redeemed: its session (or the fallback) comes first.
      return this.linkPromise.then(function () { return self.ensureSession(); });
    }
    if (this.session) {
      var expiresAt = Date.parse(this.session.expiresAt) || 0;
      if (this.session.stale || expiresAt - Date.now() < REFRESH_MARGIN_MS) {
        return this.refreshSession();
      }
      return Promise.resolve(this.session);
    }
    if (!this.sessionPromise) {
      this.sessionPromise = this.request("POST",
        "/integrations/" + encodeURIComponent(this.integrationId) + "/sessions", {})
        .then(function (res) {
          if (!res.ok) {
            var error = new Error("session refused: " + res.status);
            error.status = res.status;
            throw error;
          }
          return res.json();
        })
        .then(function (session) {
          self.session = session;
          self.readCursor = 0;
          self.persist();
          return session;
        })
        .finally(function () { self.sessionPromise = null; });
    }
    return this.sessionPromise;
  };

  // New tokens for the session (same user and conversation). A refusal (the session ended, or its
  // refresh token expired) starts over: the next call makes a new session.
  Widget.prototype.refreshSession = function () {
    var self = this;
    var session = this.session;
    if (!session || !session.refreshToken) {
      this.resetSession();
      return this.ensureSession();
    }
    if (!this.refreshPromise) {
      this.refreshPromise = fetch(this.apiUrl("/sessions/refresh"), {
        method: "POST",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({refreshToken: session.refreshToken}),
        credentials: "omit",
        mode: "cors"
      }).then(function (res) {
        if (res.status === 401) {
          if (self.session === session) {
            self.resetSession();
          }
          return self.ensureSession();
        }
        if (!res.ok) {
          var error = new Error("refresh refused: " + res.status);
          error.status = res.status;
          throw error;
        }
        return res.json().then(function (tokens) {
          if (self.session === session) {
            self.session = Object.assign({}, session, tokens);
            delete self.session.stale;
            self.persist();
          }
          return self.session;
        });
      }).finally(function () { self.refreshPromise = null; });
    }
    return this.refreshPromise;
  };

  // A 401 from the service: the token expired early (clock skew) or the session ended. The next
  // call refreshes, which tells the two apart.
  Widget.prototype.sessionRefused = function () {
    if (this.session) {
      this.session.stale = true;
    }
  };

  // The session's first message: creates its user and conversation, and brings the real session.
  // Resolves to {ok, status} like a message POST; a message sent meanwhile waits for it.
  Widget.prototype.startConversation = function (item) {
    var self = this;
    var session = this.session;
    if (this.startPromise) {
      return this.startPromise.then(function () { return self.postMessage(item); });
    }
    this.startPromise = this.request("POST", "/conversations", messageBody(item))
      .then(function (res) {
        if (!res.ok) {
          return {ok: false, status: res.status};
        }
        return res.json().then(function (body) {
          if (self.session === session) {
            self.session = {appUserId: body.appUserId, clientId: body.clientId, conversationId: body.conversationId,
              sessionToken: body.sessionToken, refreshToken: body.refreshToken, expiresAt: body.expiresAt};
            self.persist();
            self.updateStartedUi();
            // Now there is a conversation to listen to; its history brings this message back.
            if (!self.socket) {
              self.connect();
            }
          }
          return {ok: true, status: res.status};
        });
      }).finally(function () { self.startPromise = null; });
    return this.startPromise;
  };

  // The session, once its conversation exists (for calls about the conversation).
  Widget.prototype.ensureStarted = function () {
    return this.ensureSession().then(function (session) {
      if (!session.conversationId) {
        throw new Error("no conversation yet: send a message first");
      }
      return session;
    });
  };

  // POST a message with the current session: the first one starts the conversation.
  Widget.prototype.postMessage = function (item) {
    var self = this;
    return this.ensureSession().then(function (session) {
      if (!session.conversationId) {
        return self.startConversation(item);
      }
      return self.request("POST", "/conversations/" + encodeURIComponent(session.conversationId) +
        "/messages", messageBody(item));
    });
  };

  // The session is no longer valid (secret rotated, integration removed): start over.
  Widget.prototype.resetSession = function () {
    this.session = null;
    this.state = {};
    this.readCursor = 0;
    this.lastCursor = null;
    save(this.storageKey, null);
    this.updateStartedUi();
  };

  // "Continue on…" and "Notify me" need the conversation: they appear with its first message.
  Widget.prototype.updateStartedUi = function () {
    var started = this.started();
    this.continueButton.hidden = !started || !this.channels || this.channels.length === 0;
    this.notifyButton.hidden = !started || this.notifyChannels.length === 0;
    if (!started) {
      this.hideHandoff();
      this.hideNotify();
    }
  };

  // --- handoff link codes, login and logout ----------------------------------------------------

  Widget.prototype.dropSocket = function () {
    if (this.socket) {
      var socket = this.socket;
      this.socket = null;
      this.ready = false;
      try {
        socket.close();
      } catch (e) { /* already closing */ }
    }
  };

  // A session that redeemed a link code replaces whatever this browser had: the conversation it
  // opens is the one the customer came to continue.
  Widget.prototype.adoptSession = function (session) {
    this.session = session;
    this.state = {};
    this.readCursor = 0;
    this.lastCursor = null;
    this.outbox = [];
    this.saveOutbox();
    this.persist();
    this.updateStartedUi();
  };

  // Redeem `code` (POST …/sessions {linkCode}). Refused (expired, used, …): say why in the thread
  // and carry on with the session this browser had, or a fresh anonymous one.
  Widget.prototype.redeemLink = function (code) {
    var self = this;
    var previous = this.session;
    this.session = null;
    this.setStatus("connecting", "Connecting\u2026");
    this.linkPromise = fetch(this.apiUrl("/integrations/" + encodeURIComponent(this.integrationId) + "/sessions"), {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({linkCode: code}),
      credentials: "omit",
      mode: "cors"
    }).then(function (res) {
      return res.json().catch(function () { return {}; }).then(function (body) {
        if (res.ok && body && body.sessionToken) {
          return {session: body};
        }
        var title = body && body.errors && body.errors[0] && body.errors[0].title;
        return {refused: res.status >= 400 && res.status < 500 && title ? title :
          "We couldn't open this conversation right now. You can still chat with us here."};
      });
    }).catch(function () {
      return {refused: "We couldn't open this conversation right now. You can still chat with us here."};
    }).then(function (outcome) {
      self.linkPromise = null;
      if (self.destroyed) {
        return;
      }
      if (outcome.session) {
        self.adoptSession(outcome.session);
      } else {
        self.session = previous;
        if (previous) {
          self.restoreOutbox();
        }
        self.addSystemLine("link-refused", outcome.refused);
        self.list.lastChild.setAttribute("role", "alert");
      }
      self.open();
    });
    return this.linkPromise;
  };

  // Threadline.login(externalId, jwt): the visitor becomes the business's known user (merged
  // into it when it exists). The new session token is kept; the conversation stays the same,
  // unless this browser had joined someone else's conversation through a link: then it alone
  // moves to the account, and to the account's conversation.
  Widget.prototype.login = function (externalId, jwt) {
    var self = this;
    if (typeof externalId !== "string" || !externalId || typeof jwt !== "string" || !jwt) {
      return Promise.reject(new Error("Threadline.login needs (externalId, jwt) as strings"));
    }
    return this.ensureSession().then(function () {
      return self.request("POST", "/sessions/login", {externalId: externalId, jwt: jwt});
    }).then(function (res) {
      return res.json().catch(function () { return {}; }).then(function (body) {
        if (!res.ok) {
          var detail = body && body.errors && body.errors[0];
          var error = new Error((detail && detail.title) || "login refused: HTTP " + res.status);
          error.status = res.status;
          error.code = detail && detail.code;
          throw error;
        }
        return body;
      });
    }).then(function (body) {
      var sameConversation = !self.started() || self.session.conversationId === body.conversationId;
      self.session = {appUserId: body.appUserId, clientId: body.clientId, conversationId: body.conversationId,
        sessionToken: body.sessionToken, refreshToken: body.refreshToken, expiresAt: body.expiresAt,
        externalId: body.externalId};
      if (!sameConversation) {
        // A login that moved this browser alone to the account ("separated") continues in the
        // account's conversation: what the old one showed is not the account's.
        self.clearThread();
      }
      self.persist();
      self.updateStartedUi();
      // The socket was opened with the old token (or not at all, before the first message):
      // (re)open it with the new one (it resumes by cursor).
      if (self.socket) {
        self.dropSocket();
        self.connect();
      } else if (self.isOpen) {
        self.connect();
      }
      return {appUserId: body.appUserId, externalId: body.externalId, conversationId: body.conversationId,
        outcome: body.outcome};
    });
  };

  // Forget the messages shown: the next ones belong to another conversation.
  Widget.prototype.clearThread = function () {
    this.pending = {};
    this.rendered = {};
    this.forms = {};
    this.formAnswers = {};
    this.itemForms = {};
    this.tapButtons = {};
    this.latestBusinessCursor = 0;
    this.businessReadAt = 0;
    this.lastCursor = null;
    this.readCursor = 0;
    this.list.textContent = "";
    this.updateLatest();
  };

  // Threadline.logout(): forget the session on this browser; the next chat is anonymous.
  Widget.prototype.logout = function () {
    this.dropSocket();
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.reconnectAttempt = 0;
    this.resetSession();
    this.outbox = [];
    this.saveOutbox();
    this.clearThread();
    this.hideHandoff();
    this.clearUnread();
    this.setStatus("idle", "");
    if (this.isOpen) {
      this.connect();
    }
    return Promise.resolve();
  };

  // --- socket ---------------------------------------------------------------------------------

  Widget.prototype.connect = function () {
    var self = this;
    if (this.destroyed || this.socket) {
      return;
    }
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    if (!this.session && !this.linkPromise) {
      // Nothing to listen to before the first message, and no session needed to show the panel.
      this.setStatus("connected", "Online");
      this.flushOutbox();
      return;
    }
    this.setStatus(this.reconnectAttempt ? "reconnecting" : "connecting",
      this.reconnectAttempt ? "Reconnecting\u2026" : "Connecting\u2026");
    this.ensureSession().then(function (session) {
      if (self.destroyed || self.socket) {
        return;
      }
      if (!session.conversationId) {
        self.setStatus("connected", "Online");
      } else {
        self.openSocket(session);
      }
      self.flushOutbox();
    }).catch(function (error) {
      if (error && error.status && error.status >= 400 && error.status < 500 && error.status !== 429) {
        self.setStatus("error", "Chat unavailable");
        return;
      }
      self.scheduleReconnect();
    });
  };

  Widget.prototype.openSocket = function (session) {
    var self = this;
    var url = this.apiUrl("/conversations/" + encodeURIComponent(session.conversationId) + "/socket") +
      "?token=" + encodeURIComponent(session.sessionToken);
    if (this.lastCursor !== null) {
      url += "&after=" + this.lastCursor;
    }
    url = url.replace(/^http/, "ws");
    var socket = new WebSocket(url);
    this.socket = socket;
    this.ready = false;
    this.lastFrameAt = Date.now();
    socket.onmessage = function (event) {
      if (self.socket !== socket) {
        return;
      }
      self.lastFrameAt = Date.now();
      var frame;
      try {
        frame = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      self.onFrame(frame);
    };
    socket.onclose = function (event) {
      if (self.socket !== socket) {
        return;
      }
      self.socket = null;
      self.ready = false;
      self.onSocketClosed(event.code);
    };
    socket.onerror = function () {
      /* onclose follows and decides */
    };
  };

  Widget.prototype.onFrame = function (frame) {
    switch (frame.type) {
      case "message":
        this.onMessage(frame.cursor, frame.message);
        break;
      case "ready":
        this.ready = true;
        this.reconnectAttempt = 0;
        if (typeof frame.cursor === "number" && (this.lastCursor === null || frame.cursor > this.lastCursor)) {
          this.lastCursor = frame.cursor;
        }
        if (frame.pingInterval) {
          this.pingIntervalMs = frame.pingInterval * 1000;
        }
        if (frame.businessLastRead) {
          this.onBusinessRead(frame.businessLastRead);
        }
        this.setStatus("connected", "Online");
        this.maybeSendRead();
        break;
      case "typing":
        this.showBusinessTyping(!!frame.active);
        break;
      case "read":
        this.onBusinessRead(frame.at);
        break;
      case "channel":
        this.onChannelFrame(frame);
        break;
      case "error":
        // Sent just before the server closes; carries the reason even through proxies that
        // do not relay close codes.
        this.closeReason = frame.status;
        break;
      default:
        /* ping, delivery and future frames */
        break;
    }
  };

  Widget.prototype.onBusinessRead = function (at) {
    var ms = Date.parse(at) || 0;
    if (ms > this.businessReadAt) {
      this.businessReadAt = ms;
    }
    this.updateSeen();
  };

  Widget.prototype.onSocketClosed = function (code) {
    if (this.destroyed) {
      return;
    }
    if (code < 4000 && this.closeReason) {
      code = 4000 + this.closeReason;
    }
    this.closeReason = 0;
    if (code === 4401) {
      // The token expired (or the session ended): the reconnect refreshes it first, and starts
      // over only if the refresh is refused too.
      this.sessionRefused();
    } else if (code === 4404) {
      // The conversation is gone: a fresh session on the next message.
      this.resetSession();
    } else if (code === 4403) {
      this.setStatus("error", "Chat not allowed on this site");
      return;
    }
    this.scheduleReconnect();
  };

  Widget.prototype.scheduleReconnect = function () {
    var self = this;
    if (this.destroyed || this.reconnectTimer) {
      return;
    }
    var delay = backoff(this.reconnectAttempt, RECONNECT_BASE_MS, RECONNECT_CAP_MS);
    this.reconnectAttempt += 1;
    this.setStatus("reconnecting", "Reconnecting\u2026");
    this.reconnectTimer = setTimeout(function () {
      self.reconnectTimer = null;
      self.connect();
    }, delay);
  };

  Widget.prototype.reconnectNow = function () {
    if (this.socket || !this.reconnectTimer) {
      return;
    }
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.connect();
  };

  // A socket that went silent (no frame for 2.5 ping intervals) is dead even if not closed.
  Widget.prototype.checkSocket = function () {
    if (!this.socket) {
      return;
    }
    var limit = this.ready ? this.pingIntervalMs * 2.5 : CONNECT_TIMEOUT_MS;
    if (Date.now() - this.lastFrameAt > limit) {
      var socket = this.socket;
      this.socket = null;
      this.ready = false;
      try {
        socket.close();
      } catch (e) { /* already closing */ }
      this.scheduleReconnect();
    }
  };

  // --- attachments ----------------------------------------------------------------------------
  // The paper clip, a file dropped on the panel or an image pasted in the input: each file is
  // checked here (its type, its size), uploaded (POST …/attachments, with a progress bar in the
  // thread), then sent as an image or a file message through the outbox like any other message.

  function hasFiles(event) {
    var types = event.dataTransfer && event.dataTransfer.types;
    return !!types && Array.prototype.indexOf.call(types, "Files") >= 0;
  }

  // The type to upload `file` as, when it is one Threadline keeps; else null.
  function uploadType(file) {
    var name = String(file.name || "");
    var dot = name.lastIndexOf(".");
    var extension = dot >= 0 ? name.slice(dot + 1).toLowerCase() : "";
    var byName = Object.prototype.hasOwnProperty.call(UPLOAD_EXTENSIONS, extension) ?
      UPLOAD_EXTENSIONS[extension] : undefined;
    var declared = String(file.type || "").split(";")[0].trim().toLowerCase();
    // A .csv is text whatever the system calls it (Windows says application/vnd.ms-excel).
    if (byName === "text/csv" || !declared) {
      return byName || null;
    }
    return UPLOAD_TYPES.indexOf(declared) >= 0 ? declared : null;
  }

  function sizeText(bytes) {
    var units = [[1024 * 1024, "MB"], [1024, "KB"]];
    for (var i = 0; i < units.length; i++) {
      if (bytes >= units[i][0]) {
        return Math.floor(bytes * 10 / units[i][0]) / 10 + " " + units[i][1];
      }
    }
    return bytes + " bytes";
  }

  Widget.prototype.listenForFiles = function () {
    var self = this;
    var panel = this.panel;
    this.attachButton.addEventListener("click", function () { self.fileInput.click(); });
    this.fileInput.addEventListener("change", function () {
      var files = Array.prototype.slice.call(self.fileInput.files || []);
      self.fileInput.value = "";
      self.attachFiles(files);
    });
    panel.addEventListener("dragover", function (event) {
      if (!hasFiles(event)) {
        return;
      }
      event.preventDefault();
      event.dataTransfer.dropEffect = self.attachButton.disabled ? "none" : "copy";
      panel.setAttribute("data-dragging", "true");
    });
    panel.addEventListener("dragleave", function (event) {
      if (!event.relatedTarget || !panel.contains(event.relatedTarget)) {
        panel.removeAttribute("data-dragging");
      }
    });
    panel.addEventListener("drop", function (event) {
      panel.removeAttribute("data-dragging");
      if (!hasFiles(event)) {
        return;
      }
      event.preventDefault();
      self.attachFiles(Array.prototype.slice.call(event.dataTransfer.files || []));
    });
    // A pasted image (a screenshot) is attached; pasted text stays text.
    this.input.addEventListener("paste", function (event) {
      var items = (event.clipboardData && event.clipboardData.items) || [];
      var images = [];
      for (var i = 0; i < items.length; i++) {
        if (items[i].kind === "file" && /^image\//.test(items[i].type)) {
          var file = items[i].getAsFile();
          if (file) {
            images.push(file);
          }
        }
      }
      if (images.length) {
        event.preventDefault();
        self.attachFiles(images);
      }
    });
  };

  Widget.prototype.showAttachError = function (text) {
    this.attachError.textContent = text;
    if (text) {
      this.attachError.removeAttribute("hidden");
    } else {
      this.attachError.setAttribute("hidden", "");
    }
  };

  // Check each file and upload those that may be sent; say what was refused, and why.
  Widget.prototype.attachFiles = function (files) {
    var self = this;
    if (this.attachButton.disabled) {
      return;
    }
    var problems = [];
    files.forEach(function (file) {
      var name = String(file.name || "file");
      var type = uploadType(file);
      if (!type) {
        problems.push("\u201C" + name + "\u201D can\u2019t be sent: you can send " + UPLOAD_KINDS + ".");
      } else if (file.size > self.maxUploadBytes) {
        problems.push("\u201C" + name + "\u201D is too large: files can be at most " + sizeText(self.maxUploadBytes) +
          ".");
      } else if (!file.size) {
        problems.push("\u201C" + name + "\u201D is empty.");
      } else {
        self.startUpload(file, name, type);
      }
    });
    this.showAttachError(problems.join(" "));
  };

  // A file on its way: a bubble with its name and a progress bar, replaced by the message once
  // the file is stored.
  Widget.prototype.startUpload = function (file, name, type) {
    var self = this;
    var node = el("div", {"class": "tl-message", "data-threadline": "upload", "data-author": "user",
      "data-status": "pending", "data-type": /^image\//.test(type) ? "image" : "file"});
    var bubble = el("div", {"class": "tl-bubble"});
    bubble.appendChild(el("span", {"class": "tl-upload-name"}, name));
    var bar = el("progress", {"class": "tl-progress", "data-threadline": "upload-progress", "max": "100",
      "value": "0", "aria-label": "Uploading " + name});
    bubble.appendChild(bar);
    node.appendChild(bubble);
    node.appendChild(el("div", {"class": "tl-meta", "data-threadline": "meta", "data-label": "Uploading\u2026"}));
    var upload = {file: file, name: name, type: type, node: node, bar: bar, running: false};
    // A failed upload (the network, the service) is tried again by a tap, as a failed message is.
    node.addEventListener("click", function () {
      if (node.getAttribute("data-status") === "failed") {
        self.runUpload(upload);
      }
    });
    this.uploads.push(upload);
    this.list.appendChild(node);
    this.scrollToEnd();
    this.runUpload(upload);
  };

  Widget.prototype.runUpload = function (upload, retried) {
    var self = this;
    if (upload.running || this.destroyed) {
      return;
    }
    upload.running = true;
    upload.node.setAttribute("data-status", "pending");
    upload.node.lastChild.setAttribute("data-label", "Uploading\u2026");
    upload.bar.value = 0;
    this.ensureSession().then(function (session) {
      return self.postFile(upload, session);
    }).catch(function () {
      return {status: 0, body: null};
    }).then(function (result) {
      upload.running = false;
      var attachment = result.body && result.body.attachment;
      if (result.status === 201 && attachment && attachment.mediaUrl) {
        self.uploadDone(upload, attachment);
        return;
      }
      if (result.status === 401) {
        self.sessionRefused();
        if (!retried) {
          self.runUpload(upload, true);  // once, with the refreshed (or a new) session
          return;
        }
      }
      var detail = result.body && result.body.errors && result.body.errors[0];
      var reason = (detail && detail.title) || (result.status ? "HTTP " + result.status : "no connection");
      var final = result.status >= 400 && result.status < 500 && [401, 408, 429].indexOf(result.status) < 0;
      self.showAttachError("\u201C" + upload.name + "\u201D was not sent: " + reason +
        (final ? "" : " Tap it to try again."));
      if (final) {
        self.dropUpload(upload);
      } else {
        upload.node.setAttribute("data-status", "failed");
        upload.node.lastChild.setAttribute("data-label", "");
      }
    });
  };

  // POST the file (multipart, as `source`); resolves to {status, body}. XMLHttpRequest, for its
  // upload progress.
  Widget.prototype.postFile = function (upload, session) {
    var url = this.apiUrl("/attachments");
    return new Promise(function (resolve) {
      var xhr = new XMLHttpRequest();
      xhr.open("POST", url);
      xhr.setRequestHeader("Authorization", "Bearer " + session.sessionToken);
      xhr.upload.onprogress = function (event) {
        if (event.lengthComputable && event.total) {
          upload.bar.value = Math.round(event.loaded * 100 / event.total);
        }
      };
      xhr.onload = function () {
        var body = null;
        try {
          body = JSON.parse(xhr.responseText);
        } catch (e) { /* not JSON: the status says enough */ }
        resolve({status: xhr.status, body: body});
      };
      xhr.onerror = xhr.onabort = xhr.ontimeout = function () { resolve({status: 0, body: null}); };
      var form = new FormData();
      // The part's type is the one checked here (a Blob of the same bytes, not a copy).
      form.append("source", new Blob([upload.file], {type: upload.type}), upload.name);
      xhr.send(form);
    });
  };

  Widget.prototype.dropUpload = function (upload) {
    this.uploads = this.uploads.filter(function (u) { return u !== upload; });
    if (upload.node.parentNode) {
      upload.node.parentNode.removeChild(upload.node);
    }
  };

  // Stored: the upload's bubble becomes the message, sent like any other (retried, confirmed).
  Widget.prototype.uploadDone = function (upload, attachment) {
    var self = this;
    this.dropUpload(upload);
    if (!this.uploads.some(function (u) { return u.node.getAttribute("data-status") === "failed"; })) {
      this.showAttachError("");
    }
    var media = {mediaUrl: attachment.mediaUrl, mediaType: attachment.mediaType || upload.type,
      altText: upload.name.slice(0, 512)};
    var image = /^image\//.test(media.mediaType);
    var preview = null;
    if (image && window.URL && typeof URL.createObjectURL === "function") {
      preview = URL.createObjectURL(upload.file);
    }
    var extra = image ? {image: media, preview: preview} : {file: media};
    var id = this.send("", extra);
    var node = this.pending[id];
    if (node && preview) {
      node.tlPreview = preview;
      setTimeout(function () { self.scrollToEnd(); }, 0);
    }
  };

  // A pending image or file: the image from this page's copy while it has one (its URL serves it
  // only once the message is stored), else its name.
  Widget.prototype.pendingMedia = function (node, item) {
    var bubble = node.firstChild;
    var media = item.image || item.file;
    var preview = item.image && item.preview && safeUrl(item.preview, ["blob:"]);
    if (preview) {
      bubble.appendChild(el("img", {"src": preview, "alt": media.altText || "image"}));
    } else {
      bubble.appendChild(el("div", {"class": "tl-preview", "data-threadline": "file-pending"},
        media.altText || (item.image ? "image" : "file")));
    }
    if (item.text) {
      bubble.appendChild(el("div", {}, item.text));
    }
  };

  // --- sending --------------------------------------------------------------------------------

  // What an outbox item keeps (localStorage) and posts: a text, a tap (`payload`; `silent`: a
  // postback, which leaves no message), a `location`, a `formResponse`, or an uploaded `image` or
  // `file` ({mediaUrl, mediaType, altText}).
  var ITEM_FIELDS = ["id", "text", "payload", "location", "formResponse", "image", "file", "silent"];

  function storedItem(item) {
    var kept = {};
    ITEM_FIELDS.forEach(function (key) {
      if (item[key] !== undefined && item[key] !== null) {
        kept[key] = item[key];
      }
    });
    return kept;
  }

  // The body of the item's POST (the same clientMessageId on every retry).
  function messageBody(item) {
    var body = {clientMessageId: item.id, text: item.text || ""};
    if (item.payload) {
      body.payload = item.payload;
    }
    if (item.location) {
      body.location = item.location;
    }
    if (item.formResponse) {
      body.formResponse = item.formResponse;
    }
    if (item.image) {
      body.image = item.image;
    }
    if (item.file) {
      body.file = item.file;
    }
    return body;
  }

  Widget.prototype.saveOutbox = function () {
    save(this.storageKey + ":outbox", this.outbox.length ? this.outbox.map(storedItem) : null);
  };

  Widget.prototype.dropFromOutbox = function (clientMessageId) {
    var before = this.outbox.length;
    this.outbox = this.outbox.filter(function (item) { return item.id !== clientMessageId; });
    if (this.outbox.length !== before) {
      this.saveOutbox();
    }
  };

  Widget.prototype.restoreOutbox = function () {
    var self = this;
    this.outbox.forEach(function (item) {
      item.posting = false;
      var answer = item.formResponse;
      if (answer && typeof answer.quotedMessageId === "string") {
        // Its form shows as answered when the history brings it.
        self.formAnswers[answer.quotedMessageId] = answer.fields;
      }
      if (!item.silent) {
        self.addPending(item);
      }
    });
  };

  Widget.prototype.addPending = function (item) {
    var self = this;
    var node = this.messageElement("user", "pending");
    if (item.image || item.file) {
      this.pendingMedia(node, item);
    } else {
      node.firstChild.textContent = itemText(item);
    }
    node.setAttribute("data-type", itemType(item));
    node.setAttribute("data-client-message-id", item.id);
    // The whole message (bubble and its "tap to retry" line) retries a failed send.
    node.addEventListener("click", function () {
      if (node.getAttribute("data-status") === "failed") {
        node.setAttribute("data-status", "pending");
        self.post(item);
      }
    });
    this.pending[item.id] = node;
    this.list.appendChild(node);
    this.updateLatest();
    this.updateSeen();
    this.scrollToEnd();
  };

  Widget.prototype.sendFromInput = function () {
    var text = this.input.value;
    if (!text.trim()) {
      return;
    }
    this.input.value = "";
    this.stopTyping();
    this.send(text);
  };

  // Queue a message and post it: a text, or (`extra`) a tap `{payload, silent?}`, a `{location}`,
  // a `{formResponse}`, or an uploaded `{image}` or `{file}` (`preview`: a local URL to show the
  // image by until it is stored). Returns its clientMessageId.
  Widget.prototype.send = function (text, extra) {
    var item = {id: uuid(), text: String(text || "").slice(0, 4096)};
    ITEM_FIELDS.forEach(function (key) {
      if (extra && key !== "id" && key !== "text" && extra[key] !== undefined) {
        item[key] = extra[key];
      }
    });
    if (extra && extra.preview) {
      item.preview = extra.preview;  // this page view only (not kept in the outbox)
    }
    this.outbox.push(item);
    this.saveOutbox();
    if (!item.silent) {
      this.addPending(item);
    }
    this.post(item);
    return item.id;
  };

  Widget.prototype.flushOutbox = function () {
    var self = this;
    this.outbox.forEach(function (item) {
      if (!item.posting && (item.silent || (self.pending[item.id] &&
          self.pending[item.id].getAttribute("data-status") === "pending"))) {
        self.post(item);
      }
    });
  };

  // POST with retries; the same clientMessageId makes every retry the same message.
  Widget.prototype.post = function (item) {
    var self = this;
    if (item.posting) {
      return;
    }
    item.posting = true;
    var attempt = 0;
    var run = function () {
      if (self.destroyed) {
        return Promise.resolve();
      }
      return self.postMessage(item).then(function (res) {
        var node = self.pending[item.id];
        if (res.ok) {
          if (node && node.getAttribute("data-status") === "pending") {
            node.setAttribute("data-status", "sent");
          }
          if (item.silent) {
            // A postback: accepted is all there is (no message comes back to confirm it).
            self.dropFromOutbox(item.id);
            self.tapDone(item, true);
          }
          return null;
        }
        if (res.status === 401) {
          self.sessionRefused();
        }
        if (res.status >= 400 && res.status < 500 && res.status !== 401 && res.status !== 408 &&
            res.status !== 429) {
          if (node) {
            node.setAttribute("data-status", "failed");
          }
          self.dropFromOutbox(item.id);
          self.itemRefused(item);
          return null;
        }
        throw new Error("retry " + res.status);
      }).catch(function () {
        attempt += 1;
        return sleep(backoff(attempt, 1000, POST_RETRY_CAP_MS)).then(run);
      });
    };
    run().finally(function () { item.posting = false; });
  };

  // The service refused an item for good (4xx): a postback's button says so, a form opens again.
  Widget.prototype.itemRefused = function (item) {
    if (item.silent) {
      this.tapDone(item, false);
    }
    var form = this.itemForms[item.id];
    delete this.itemForms[item.id];
    if (form) {
      this.setFormState(form, "open", null);
    }
  };

  // --- typing and read ------------------------------------------------------------------------

  Widget.prototype.activity = function (type) {
    var self = this;
    if (!this.started()) {
      return;
    }
    this.ensureStarted().then(function (session) {
      return self.request("POST", "/conversations/" + encodeURIComponent(session.conversationId) + "/activity",
        {type: type});
    }).then(function (res) {
      if (res.status === 401) {
        self.sessionRefused();
      }
    }).catch(function () { /* best effort: typing/read are not worth retrying */ });
  };

  Widget.prototype.onTyping = function () {
    var self = this;
    if (!this.input.value.trim()) {
      this.stopTyping();
      return;
    }
    if (!this.typingSent) {
      this.typingSent = true;
      this.activity("typing:start");
    }
    clearTimeout(this.typingTimer);
    this.typingTimer = setTimeout(function () { self.stopTyping(); }, TYPING_IDLE_MS);
  };

  Widget.prototype.stopTyping = function () {
    clearTimeout(this.typingTimer);
    if (this.typingSent) {
      this.typingSent = false;
      this.activity("typing:stop");
    }
  };

  Widget.prototype.isReading = function () {
    return this.isOpen && document.visibilityState === "visible";
  };

  Widget.prototype.maybeSendRead = function () {
    if (!this.isReading() || !this.started() || this.latestBusinessCursor <= this.readCursor) {
      return;
    }
    this.readCursor = this.latestBusinessCursor;
    this.persist();
    this.clearUnread();
    this.activity("conversation:read");
  };

  Widget.prototype.destroy = function () {
    this.destroyed = true;
    clearInterval(this.watchdog);
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.typingTimer);
    clearTimeout(this.businessTypingTimer);
    document.removeEventListener("visibilitychange", this.onVisibility);
    window.removeEventListener("online", this.onOnline);
    if (this.socket) {
      var socket = this.socket;
      this.socket = null;
      socket.close();
    }
    if (this.root.parentNode) {
      this.root.parentNode.removeChild(this.root);
    }
  };

  var current = null;

  window.Threadline = {
    version: "0.1.0",
    /** Start the widget: {appId, integrationId, baseUrl?, linkCode?} (baseUrl defaults to this script's
     * origin; linkCode to the page URL's `threadline_code`, a handoff link to continue a conversation). */
    init: function (options) {
      if (current) {
        current.destroy();
      }
      current = new Widget(options);
      return current;
    },
    open: function () { if (current) { current.open(); } },
    close: function () { if (current) { current.close(); } },
    send: function (text) { return current ? current.send(text) : null; },
    /** Log the visitor in as the business's user: a JWT {scope: "user", external_id} (HS256, kid = app key). */
    login: function (externalId, jwt) {
      return current ? current.login(externalId, jwt) : Promise.reject(new Error("Threadline.init first"));
    },
    /** Forget this browser's session; the next conversation is anonymous. */
    logout: function () { return current ? current.logout() : Promise.resolve(); },
    destroy: function () {
      if (current) {
        current.destroy();
        current = null;
      }
    }
  };
})();
