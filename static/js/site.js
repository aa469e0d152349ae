// site.js — what every signed-in page does with the realtime client:
//   - shows the connection status in the top bar (#rt-status);
//   - subscribes to system:announcements and shows a toast per ANNOUNCEMENT;
//   - subscribes the channels of every [data-realtime-channels] element while
//     it is on the page (the channel_subscriber macro), and unsubscribes when
//     it is removed;
//   - hands the message that triggered an htmx request to the server, so a
//     fragment can be rendered from it (see templates/_realtime.html);
//   - never lets a request fail in silence: a fragment's update refused
//     because the page's sign-in changed reloads the page, another failure
//     says so in the fragment; a form's failure says so in a toast.
// Message text is always inserted as text, never as HTML.

import { getClient, channels } from "./realtime.js";

const STATUS_TEXT = {
  idle: "Not connected",
  connecting: "Connecting…",
  open: "Live",
  reconnecting: "Reconnecting…",
  offline: "Offline",
  unauthorized: "Signed out",
  error: "Connection error (see the console)",
};
const TOAST_MS = 10000;
// Toasts shown one by one; older ones fold into one "earlier" toast at the top, which lists the latest
// EARLIER_LISTED of them (a tab in the background through a shift gathers a hundred or more, each kept
// until seen: a screenful of them to close one by one, and DOM nodes without bound).
const TOASTS_SHOWN = 6;
const EARLIER_LISTED = 50;

function clientOptions(body) {
  // Timings can be tuned per deployment (and by tests) with data-realtime-* on <body>.
  const options = {};
  for (const [attr, key] of [
    ["realtimeIdleMs", "idleMs"],
    ["realtimePongTimeoutMs", "pongTimeoutMs"],
    ["realtimeMaxDelayMs", "maxDelayMs"],
  ]) {
    if (body.dataset[attr]) options[key] = Number(body.dataset[attr]);
  }
  // Where the stream was when this page was rendered: what is broadcast from then until the page has
  // subscribed is replayed to it (see the `since` option of realtime.js).
  options.since = renderedAt(body);
  return options;
}

// The stream's position an element's request was rendered at (`data-realtime-epoch`/`-offset`, which
// base.html puts on <body> and the channel_subscriber macro on each subscriber), or null.
function renderedAt(element) {
  const { realtimeEpoch: epoch, realtimeOffset: offset } = element.dataset;
  return epoch ? { epoch, offset: Number(offset) } : null;
}

// -- status indicator ---------------------------------------------------------

function showStatus(status) {
  const indicator = document.getElementById("rt-status");
  if (!indicator) return;
  const text = STATUS_TEXT[status] || status;
  indicator.dataset.status = status;
  indicator.setAttribute("aria-label", `Live updates: ${text}`);
  indicator.querySelector(".rt-status-text").textContent = text;
}

// -- announcement toasts --------------------------------------------------------

function messageText(data) {
  if (data && typeof data.message === "string") return data.message;
  return JSON.stringify(data);
}

function timeOf(at) {
  const when = at ? new Date(at) : null;
  if (!when || Number.isNaN(when.getTime())) return null;
  const time = document.createElement("time");
  time.dateTime = when.toISOString();
  time.textContent = when.toLocaleTimeString();
  return time;
}

const shownToasts = new WeakMap(); // toast -> {remove, renew}: its own dismissal, and its wait started over
let toastsMade = 0; // each toast's number, kept by its line once folded: the lines stay in the order they came

export function toast(title, text, at) {
  const body = document.createElement("p");
  body.className = "toast-text";
  body.textContent = text; // text, never HTML
  const item = showToast(title, body, timeOf(at));
  if (item) foldOlderToasts(item.parentElement);
  return item;
}

function showToast(title, ...content) {
  const container = document.getElementById("toasts");
  if (!container) return null;
  const item = document.createElement("div");
  item.className = "toast";
  const heading = document.createElement("strong");
  heading.textContent = title;
  item.append(heading, ...content.filter(Boolean));
  const close = document.createElement("button");
  close.type = "button";
  close.className = "toast-close";
  close.setAttribute("aria-label", "Dismiss");
  close.textContent = "×";
  item.append(close);

  // Auto-hide, but not while someone is reading it (hover or keyboard focus), nor while nobody can see
  // it: one that came while the tab was in the background would have gone before anyone looked. The
  // wait starts over when the tab is shown again.
  let timer = null;
  let reading = false; // the pointer is on it, or the keyboard's focus is in it
  const wait = () => {
    clearTimeout(timer);
    if (!reading && document.visibilityState === "visible") timer = setTimeout(remove, TOAST_MS);
  };
  const read = (now) => () => {
    reading = now;
    wait();
  };
  const remove = () => {
    clearTimeout(timer);
    document.removeEventListener("visibilitychange", wait);
    item.remove();
  };
  close.addEventListener("click", remove);
  item.addEventListener("mouseenter", read(true));
  item.addEventListener("focusin", read(true));
  item.addEventListener("mouseleave", read(false));
  item.addEventListener("focusout", read(false));
  document.addEventListener("visibilitychange", wait);
  container.append(item);
  item.dataset.toast = String((toastsMade += 1));
  shownToasts.set(item, { remove, renew: wait });
  wait();
  return item;
}

// Past TOASTS_SHOWN, the oldest fold into the "earlier" toast: a line each, in the order they came
// (the text as it was, the time, its title when not "Announcement"), the latest EARLIER_LISTED of them.
// Not one being read (the pointer on it, or the keyboard's focus in it): the next oldest goes instead.
function foldOlderToasts(container) {
  const single = Array.from(container.querySelectorAll(":scope > .toast:not(.toast-earlier)"));
  if (single.length <= TOASTS_SHOWN) return;
  const folding = single.filter((item) => !item.matches(":hover, :focus-within")).slice(0, single.length - TOASTS_SHOWN);
  if (!folding.length) return;
  const earlier = container.querySelector(":scope > .toast-earlier") || earlierToast(container);
  const list = earlier.querySelector("ul");
  for (const item of folding) {
    const line = document.createElement("li");
    const title = item.querySelector("strong").textContent;
    const text = item.querySelector(".toast-text").textContent;
    line.textContent = title === "Announcement" ? text : `${title}: ${text}`;
    const time = item.querySelector("time");
    if (time) line.append(" ", time);
    if (item.classList.contains("toast-error")) line.className = "toast-error";
    line.dataset.toast = item.dataset.toast;
    // After the newer lines one spared while it was read (below) had: before them.
    const newer = Array.from(list.children).find((other) => Number(other.dataset.toast) > Number(line.dataset.toast));
    list.insertBefore(line, newer || null);
    shownToasts.get(item).remove();
    earlier.dataset.folded = String(Number(earlier.dataset.folded) + 1);
  }
  while (list.children.length > EARLIER_LISTED) list.firstElementChild.remove();
  const folded = Number(earlier.dataset.folded);
  earlier.querySelector("strong").textContent = `${folded} earlier notice${folded === 1 ? "" : "s"}`;
  const unlisted = folded - list.children.length;
  const more = earlier.querySelector(".toast-unlisted");
  more.hidden = unlisted <= 0;
  more.textContent = `and ${unlisted} older, not listed`;
  shownToasts.get(earlier).renew(); // news in it: its 10 s start over
}

function earlierToast(container) {
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = "Show them";
  const more = document.createElement("p");
  more.className = "toast-unlisted";
  details.append(summary, more, document.createElement("ul"));
  const earlier = showToast("", details);
  earlier.classList.add("toast-earlier");
  earlier.setAttribute("aria-live", "off"); // each toast is announced as it comes, not again as it folds
  earlier.dataset.folded = "0";
  container.prepend(earlier);
  return earlier;
}

// -- channel subscribers -----------------------------------------------------------

// element -> {names, last, taken, waiting, catchUp}: its channels and whether to last values; whether it has
// subscribed yet (taken), the listener that waits for htmx to set it up (waiting), its catch-up timer.
const subscribed = new Map();

function channelsOf(element) {
  return (element.dataset.realtimeChannels || "").split(/\s+/).filter(Boolean);
}

function subscribersIn(node) {
  if (node.nodeType !== Node.ELEMENT_NODE) return [];
  const found = node.matches("[data-realtime-channels]") ? [node] : [];
  return found.concat([...node.querySelectorAll("[data-realtime-channels]")]);
}

// What makes two subscribers alike: the same channels, asking for their last values or not.
function likeness(element) {
  return `${element.dataset.realtimeLast === "true"} ${channelsOf(element).join(" ")}`;
}

function attach(rt, element, swappedOut = new Set()) {
  if (subscribed.has(element) || !element.isConnected) return;
  const names = channelsOf(element);
  const last = element.dataset.realtimeLast === "true";
  const held = { names, last, taken: false, waiting: null, catchUp: null };
  subscribed.set(element, held);
  const take = (options) => {
    held.taken = true;
    rt.subscribe(names, { last, ...options });
  };
  // Swapped in for a subscriber like it (an htmx swap of the fragment, or of a parent around it): it
  // was rendered with the state, and asking for the last value again would re-render every fragment of
  // those channels, and one re-rendered on each message of its channel would ask forever. (So a parent's
  // render must give it its state, as the queue page does, not a placeholder.) Taken at once: the
  // channels stay held while the one it replaces goes. But see catchUpLater.
  if (swappedOut.has(likeness(element))) {
    take({ ask: false });
    return whenSetUp(element, held, () => catchUpLater(rt, element, held));
  }
  // A fragment swapped in later, for a channel the page did not hold, is given what was broadcast to it
  // since its render.
  whenSetUp(element, held, () => take({ since: renderedAt(element) }));
}

// `then()` once htmx has set up the subscriber's triggers: it does that to a swapped-in element only as
// the swap settles (immediately on these pages, see base.html; 20 ms later by htmx's default, a second
// or more in a background tab), and what came before (a replay, a last value) would reach no trigger of
// it. A subscriber htmx will not set up (no request of its own, htmx disabled there, or absent) has
// nothing to wait for.
const HTMX_REQUESTS = ["get", "post", "put", "patch", "delete"].flatMap((verb) => [`hx-${verb}`, `data-hx-${verb}`]);

function whenSetUp(element, held, then) {
  const htmx = window.htmx;
  if (!htmx || !HTMX_REQUESTS.some((name) => element.hasAttribute(name))) return then();
  if (element.closest(htmx.config.disableSelector)) return then();
  const setUp = element["htmx-internal-data"]; // htmx 2 keeps what it set up there; initHash once it has
  if (setUp && setUp.initHash) return then();
  held.waiting = (event) => {
    if (event.target !== element) return; // one inside it (the event bubbles)
    element.removeEventListener("htmx:afterProcessNode", held.waiting);
    held.waiting = null;
    then();
  };
  element.addEventListener("htmx:afterProcessNode", held.waiting);
}

function detach(rt, element) {
  const held = subscribed.get(element);
  if (!held || element.isConnected) return;
  subscribed.delete(element);
  if (held.waiting) element.removeEventListener("htmx:afterProcessNode", held.waiting);
  clearTimeout(held.catchUp);
  if (held.taken) rt.unsubscribe(held.names, { last: held.last });
}

// A like-for-like swap brings the state as of its render; a message of the fragment's types shown after
// that (one that came while the parent's request was out) went to the fragment it replaced, and this one
// shows the older state under "Live". The next message of those types re-renders it anyway; if none
// comes within a moment, a fragment of its channels' last value asks for it (at once, under steady
// traffic, one that re-renders itself would ask on every swap).
const CATCH_UP_AFTER_MS = 1000;

function catchUpLater(rt, element, held) {
  if (!held.last) return;
  const rendered = renderedAt(element);
  const types = typesOf(element);
  const newest = newestShown(types, rendered);
  if (newest === null || newest <= rendered.offset) return;
  held.catchUp = setTimeout(() => {
    if (element.isConnected && newestShown(types, rendered) === newest) rt.askLast(held.names);
  }, CATCH_UP_AFTER_MS);
}

// The message types a subscriber's triggers react to ("realtime:QUEUE_UPDATE from:body, ...").
function typesOf(element) {
  return [...(element.getAttribute("hx-trigger") || "").matchAll(/realtime:(\S+) from:body/g)].map((m) => m[1]);
}

// The highest offset shown of each message type, in the stream it was shown in (see catchUpLater).
const newestOfType = new Map();
const NEWEST_TYPES_KEPT = 200;

function noteShown(message, epoch) {
  if (message.last || typeof message.offset !== "number" || !epoch) return;
  const had = newestOfType.get(message.type);
  // (A replay can show older frames after newer ones: frames of a channel the page did not hold.)
  if (had && had.epoch === epoch && had.offset >= message.offset) return;
  newestOfType.delete(message.type); // to the end: the type seen longest ago goes first
  newestOfType.set(message.type, { epoch, offset: message.offset });
  if (newestOfType.size > NEWEST_TYPES_KEPT) newestOfType.delete(newestOfType.keys().next().value);
}

// The highest offset shown of `types` in the stream of `rendered` (a position), or null.
function newestShown(types, rendered) {
  if (!rendered) return null;
  let newest = null;
  for (const type of types) {
    const shown = newestOfType.get(type);
    if (shown && shown.epoch === rendered.epoch && (newest === null || shown.offset > newest)) newest = shown.offset;
  }
  return newest;
}

function watchSubscribers(rt) {
  for (const element of subscribersIn(document.body)) attach(rt, element);
  new MutationObserver((records) => {
    // Additions first: an htmx swap that replaces a subscriber with an equal one
    // then nets out to no UNSUBSCRIBE/SUBSCRIBE traffic at all.
    const removed = records.flatMap((record) => [...record.removedNodes].flatMap(subscribersIn));
    // (One that never subscribed, still waiting for htmx, held nothing for a like one to keep.)
    const swappedOut = new Set(removed.filter((e) => !e.isConnected && subscribed.get(e)?.taken).map(likeness));
    for (const record of records) for (const node of record.addedNodes) subscribersIn(node).forEach((e) => attach(rt, e, swappedOut));
    for (const element of removed) detach(rt, element);
  }).observe(document.body, { childList: true, subtree: true });
}

// After a resync (what was missed could not be replayed), a fragment rendered from messages (post=)
// may be stale. With last=true: show that it is waiting until the channel's last value, which the
// resubscription asks for, renders it again (with no last value it stays waiting). Without: say that
// messages sent meanwhile may be missing, until the next one is rendered.
// A channel revoked on the open socket (the user's role or clinic changed): its fragment will not
// move again, so it says so instead of showing what it showed under "Live".
const REVOKED_TEXT = "This is no longer available to you (your role or clinic changed): reload the page.";

// A polled fragment (htmx's `every`: the dashboard's figures, every 2 s) asks nothing while its tab is
// hidden: nobody sees the answers, and an admin's tab left open all day asked ~20,000 times. The next
// tick after the tab is shown asks again.
function pauseHiddenPolls() {
  document.body.addEventListener("htmx:beforeRequest", (event) => {
    const element = event.detail.elt;
    const polled = element && (element.getAttribute("hx-trigger") || "").trim().startsWith("every ");
    if (polled && document.visibilityState === "hidden") event.preventDefault();
  });
}

// A fragment that adds each message (a list of alerts, swap= afterbegin or beforeend) keeps what it
// showed, which is still true: the note goes where the next message will, marking the gap in place.
function clearStaleFragments() {
  document.body.addEventListener("realtime:resync", (event) => {
    const only = event.detail && event.detail.channels; // a resync for some channels only
    const revoked = event.detail && event.detail.reason === "revoked";
    for (const [element, { names }] of subscribed) {
      const text = element.dataset.realtimeResync;
      if (!text || (only && !names.some((name) => only.includes(name)))) continue;
      const target = targetOf(element);
      if (!target) continue;
      const adding = !revoked && addsAt(element);
      const note = document.createElement("p");
      note.className = "muted";
      if (revoked) note.dataset.resyncState = "revoked";
      else note.dataset.resyncState = element.dataset.realtimeLast === "true" ? "waiting" : "missing";
      note.textContent = revoked ? REVOKED_TEXT : text;
      if (!adding) {
        target.replaceChildren(note);
      } else if (!isMissingNote(adding === "afterbegin" ? target.firstElementChild : target.lastElementChild)) {
        // (A second resync with nothing in between: marked already.) One that gives a revoked channel
        // back takes its "no longer available" away.
        target.querySelectorAll(":scope > [data-resync-state=revoked]").forEach((old) => old.remove());
        addToList(element, target, note);
      }
    }
  });
}

function targetOf(element) {
  const where = element.dataset.realtimeTarget;
  return !where || where === "this" ? element : document.querySelector(where);
}

// Where a fragment that adds each message puts the next one ("afterbegin", "beforeend": the macro
// renders data-realtime-swap for those only), or null.
function addsAt(element) {
  return element.dataset.realtimeSwap || null;
}

// A note put in a list where the next message would go, the oldest trimmed past `keep`.
function addToList(element, target, node) {
  target.insertAdjacentElement(addsAt(element), node);
  keepNewest(element, target);
}

function isMissingNote(node) {
  return Boolean(node && node.dataset && node.dataset.resyncState === "missing");
}

// At most `keep` (data-realtime-keep) children in a fragment that adds each message: the oldest go.
function keepNewest(element, target) {
  const keep = Number(element.dataset.realtimeKeep);
  const adding = addsAt(element);
  if (!adding || !(keep > 0)) return;
  while (target.children.length > keep) {
    (adding === "afterbegin" ? target.lastElementChild : target.firstElementChild).remove();
  }
}

function boundAddedLists() {
  document.body.addEventListener("htmx:afterSwap", (event) => {
    // Fired on the target: the subscriber that asked is the request's element.
    const element = event.detail.requestConfig && event.detail.requestConfig.elt;
    if (element && subscribed.has(element)) keepNewest(element, event.detail.target || targetOf(element));
  });
}

function passMessagesToHtmx() {
  document.body.addEventListener("htmx:configRequest", (event) => {
    const trigger = event.detail.triggeringEvent;
    if (trigger && trigger.type && trigger.type.startsWith("realtime:") && event.detail.verb !== "get") {
      event.detail.parameters.message = JSON.stringify(trigger.detail);
    }
  });
}

// A request that fails is not swapped in (htmx-config in base.html), which alone would leave a queue
// screen showing old state under a "Live" status, or a form giving its button back without a word.
// - A fragment (a channel subscriber's update, the dashboard's polled figures) refused for the page's
//   sign-in (401: signed out since it was loaded; 403: signed in again elsewhere, so its CSRF token is
//   stale): a reload brings a fresh page (or the sign-in page), once a minute at most, so a reload that
//   does not help cannot loop; after that the fragment says to reload. Any other failure (a server
//   error, the network) says in the fragment that it may be out of date, until its next update; a
//   channel subscriber's update that failed for a reason that passes is asked again (see retryLater).
// - A form: a toast says it did not go through (what was typed stays).
const RELOAD_KEY = "realtime-reloaded-at";
const RELOAD_EVERY_MS = 60000;

// True if it reloaded the page: not when it did within the last minute (a reload that does not help
// cannot loop faster than that).
function reloadAtMostOnceAMinute() {
  const since = Date.now() - Number(sessionStorage.getItem(RELOAD_KEY) || 0);
  if (since >= 0 && since <= RELOAD_EVERY_MS) return false; // below 0: the clock was stepped back
  sessionStorage.setItem(RELOAD_KEY, String(Date.now()));
  location.reload();
  return true;
}

// A connection that gave up ("unauthorized": signed out, disabled, tokens refused; "error": a protocol
// error) tries again only when its tab is shown or its window focused: a wall screen nobody touches
// would show its last state for good, under a status label alone (its session ends 12 h after sign-in,
// and the next reconnect, a deploy's, finds it). After a minute in that state the page reloads itself,
// once a minute at most: a session that ended lands on the sign-in page, one that did not starts a new
// connection. Not while someone types into the page (what was typed would go): a minute later again.
const GAVE_UP = new Set(["unauthorized", "error"]);
const GAVE_UP_RELOAD_MS = 60000;
let gaveUpTimer = null;

function reloadWhenGivenUp(status) {
  if (!GAVE_UP.has(status)) {
    clearTimeout(gaveUpTimer);
    gaveUpTimer = null;
  } else if (!gaveUpTimer) {
    gaveUpTimer = setTimeout(function tryReload() {
      const typing = document.activeElement && document.activeElement.matches("input, textarea, select");
      if (typing || !reloadAtMostOnceAMinute()) gaveUpTimer = setTimeout(tryReload, GAVE_UP_RELOAD_MS);
    }, GAVE_UP_RELOAD_MS);
  }
}

// In a fragment that adds each message (a list), the note goes where the message would have: it marks
// the place of the one not shown, and stays, as the others do. Returns the note.
function fragmentNote(element, target, state, text) {
  const note = document.createElement("p");
  note.className = "muted fragment-error";
  note.dataset.fragmentState = state;
  note.textContent = text;
  if (addsAt(element)) {
    addToList(element, target, note);
  } else {
    target.querySelectorAll(":scope > .fragment-error").forEach((old) => old.remove());
    target.prepend(note);
  }
  return note;
}

// A channel subscriber's update that failed for a reason that passes (a deploy's restarting worker, a
// proxy's 502, the network) is asked again, four times over about a minute (jittered: a deploy's pages
// do not all ask at once), and swapped in where it would have been: its note marks the place (in a
// list, newer alerts go above it). Given up once the note is gone: a newer update replaced the fragment
// (this one's older state must not be shown over it), the list trimmed it, or the fragment went.
const RETRY_MS = [2000, 5000, 15000, 30000];
const RETRY_TIMEOUT_MS = 10000;
const PASSES = (status) => status === 0 || status === 429 || status >= 500;

// The request to ask again: a channel subscriber's update (triggered by a realtime: event), else null.
// As htmx sent it: the message (see passMessagesToHtmx), its headers but those htmx left out (null).
function updateRequest(config) {
  const trigger = config && config.triggeringEvent;
  if (!trigger || !trigger.type || !trigger.type.startsWith("realtime:")) return null;
  // In the body as htmx puts it (the macro's subscribers use POST and GET only; a GET carries none)
  const inBody = ["post", "put", "patch"].includes(config.verb);
  const body = inBody ? new URLSearchParams({ message: JSON.stringify(trigger.detail) }) : undefined;
  const headers = Object.fromEntries(Object.entries(config.headers || {}).filter(([, value]) => value != null));
  return { method: config.verb.toUpperCase(), path: config.path, headers, body };
}

function failedUpdate(element, target, status, request, note = null, tried = 0) {
  const say = (state, text) => {
    if (!note || !note.isConnected) return (note = fragmentNote(element, target, state, text));
    note.dataset.fragmentState = state;
    note.textContent = text;
  };
  if (status === 401 || status === 403) {
    if (reloadAtMostOnceAMinute()) return;
    say("signed-out", "This page can no longer be updated: reload it (you may need to sign in again).");
    return;
  }
  const why = status ? `the server answered ${status}` : "the server could not be reached";
  if (request && PASSES(status) && tried < RETRY_MS.length) {
    say("retrying", `Not up to date yet: the latest update could not be shown (${why}). Trying again…`);
    retryLater(element, target, request, note, tried);
  } else {
    say("stale", `Not up to date: the latest update could not be shown (${why}). Reload the page to be sure.`);
  }
}

function retryLater(element, target, request, note, tried) {
  const delay = RETRY_MS[tried] * (0.5 + Math.random() / 2);
  const wanted = () => note.isConnected && element.isConnected; // not replaced, and still on the page
  setTimeout(async () => {
    if (!wanted()) return;
    let status = 0;
    let html = null;
    const abort = new AbortController(); // not AbortSignal.timeout: Safari before 16 lacks it
    const giveUp = setTimeout(() => abort.abort(), RETRY_TIMEOUT_MS);
    try {
      const { method, path, headers, body } = request;
      const answer = await fetch(path, { method, headers, body, credentials: "same-origin", signal: abort.signal });
      status = answer.status;
      if (answer.ok) html = await answer.text();
    } catch (error) {
      status = 0; // the network, or no answer in time
    } finally {
      clearTimeout(giveUp);
    }
    if (!wanted()) return; // a newer update came while this one was asked
    if (html === null) return failedUpdate(element, target, status, request, note, tried + 1);
    if (status === 204) return void note.remove(); // nothing to show (htmx swaps no 204 either)
    if (addsAt(element)) {
      window.htmx.swap(note, html, { swapStyle: "outerHTML" });
      keepNewest(element, target);
    } else {
      window.htmx.swap(target, html, { swapStyle: (element.getAttribute("hx-swap") || "innerHTML").split(/\s+/)[0] });
    }
  }, delay);
}

function showFailures() {
  const failed = (event) => {
    const element = event.detail.elt;
    if (!element) return;
    const status = event.detail.xhr ? event.detail.xhr.status : 0;
    if (element.closest("form")) {
      const why = !status
        ? "the server could not be reached. Check the connection and try again."
        : status >= 500
          ? `the server answered ${status} (it may be restarting, or a service it needs is down). Try again in a moment.`
          : `the server answered ${status}. Reload the page and try again.`;
      const item = toast("Not done", `That did not go through: ${why}`);
      if (item) item.classList.add("toast-error");
      return;
    }
    failedUpdate(element, event.detail.target || element, status, updateRequest(event.detail.requestConfig));
  };
  document.body.addEventListener("htmx:responseError", failed);
  document.body.addEventListener("htmx:sendError", failed);
}

// -- start --------------------------------------------------------------------------

const rt = getClient(clientOptions(document.body));
window.realtime = rt; // handy in the console
rt.onStatus(showStatus);
rt.onStatus(reloadWhenGivenUp);
rt.subscribe([channels.system.announcements]);
// Announcements come one at a time, or many at once when missed ones are replayed after a
// reconnect: more than a few within a moment collapse into one summary toast.
const TOAST_BURST = 3;
const TOAST_GATHER_MS = 300;
let arriving = [];
function announce(message) {
  arriving.push(message);
  if (arriving.length > 1) return;
  setTimeout(() => {
    const batch = arriving;
    arriving = [];
    if (batch.length <= TOAST_BURST) {
      for (const m of batch) toast("Announcement", messageText(m.data), m.data && m.data.at);
      return;
    }
    const latest = batch[batch.length - 1];
    const item = toast(`${batch.length} announcements`, `Latest: ${messageText(latest.data)}`, latest.data && latest.data.at);
    if (item) item.classList.add("toast-summary");
  }, TOAST_GATHER_MS);
}
rt.onMessage((message) => {
  noteShown(message, rt.position && rt.position.epoch);
  // A last value is the state a fragment shows, not news: no toast (another subscriber asked for it).
  if (message.type === "ANNOUNCEMENT" && !message.last) announce(message);
});
// Announcements that could not be replayed (away past the recovery window, a history lost): say so
// once, rather than let the silence say there were none.
rt.onResync((detail) => {
  const only = detail && detail.channels;
  if (only && !only.includes(channels.system.announcements)) return;
  const item = toast("Reconnected", "Announcements sent while this page was disconnected may be missing.");
  if (item) item.classList.add("toast-resync");
});
passMessagesToHtmx();
pauseHiddenPolls();
showFailures();
clearStaleFragments();
boundAddedLists();
watchSubscribers(rt);
