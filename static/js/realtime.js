// realtime.js — the browser side of the clinic realtime service.
//
// One WebSocket per tab, shared by every subscriber on the page (the
// equivalent of the original useWebSocket + useWebSocketConnection hooks).
// No dependencies, no build step: import it as an ES module.
//
//   import { getClient, channels } from "/static/js/realtime.js";
//   const rt = getClient();
//   rt.subscribe([channels.clinic.queue("clinic-1")]);
//   rt.onMessage((msg) => console.log(msg.type, msg.data));
//
// Every message is also re-emitted on document.body as DOM events
// `realtime:message` and `realtime:<TYPE>` (detail = the message), so HTMX can
// react without custom JS: hx-trigger="realtime:QUEUE_UPDATE from:body".
//
// Nothing is lost across a reconnect: the client remembers its clientId, the
// stream's epoch and the offset of the last broadcast it processed, and
// resumes with them; the server replays what it missed, in order. When the
// server cannot (`recovered: false`: the window passed, the store was lost),
// the client subscribes again and dispatches `realtime:resync`, so a page
// refetches what it shows. `subscribe(names, {last: true})` asks for the latest
// message of each channel on every (re)subscription.
//
// Status: connecting → open → reconnecting (lost, retrying) | offline (the
// browser is offline) | unauthorized (signed out, or the server refuses us; tried
// again when the person comes back to the tab: they may have signed in elsewhere) |
// error (this client broke the protocol: a bug to report, so it stops; the
// console says why and `realtime:error` is dispatched with {code, reason}).

/**
 * Channel-name builders, the same as relay.channels in Python (a test keeps them equal).
 * Ids must match /^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$/; anything else throws.
 * @type {{system: {announcements: string, maintenance: string},
 *         clinic: {queue: (clinicId: string) => string, alerts: (clinicId: string) => string},
 *         user: {notifications: (userId: string) => string}}}
 */
export const channels = Object.freeze({
  system: Object.freeze({
    announcements: "system:announcements",
    maintenance: "system:maintenance",
  }),
  clinic: Object.freeze({
    queue: (clinicId) => `clinic:${checkId(clinicId)}:queue`,
    alerts: (clinicId) => `clinic:${checkId(clinicId)}:alerts`,
  }),
  user: Object.freeze({
    notifications: (userId) => `user:${checkId(userId)}:notifications`,
  }),
});

const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$/;

function checkId(id) {
  if (typeof id !== "string" || !ID_PATTERN.test(id)) {
    throw new Error(`invalid id ${JSON.stringify(id)}`);
  }
  return id;
}

// What to do on each close code: the table in relay/codes.py, code by code.
//   token     fetch a fresh token and reconnect at once (then back off if fresh ones fail too)
//   restart   the server is restarting: reconnect now, with a little jitter
//   backoff   reconnect after an exponentially growing, fully jittered wait
//   forbidden the user may not connect: stop ("unauthorized")
//   fatal     this client broke the protocol: stop ("error") and report it
const CLOSE_ACTIONS = Object.freeze({
  1000: "backoff", // the server is done with this socket; we still need one
  1002: "fatal", // protocol error: RFC 6455 framing broken by this client
  1007: "fatal", // a text frame that was not UTF-8
  1008: "backoff", // too many messages too fast
  1009: "backoff", // a message over the size limit: reported, never resent
  1011: "backoff", // a server error
  1012: "restart", // service restart (deploy)
  1013: "backoff", // try again later: overloaded, slow consumer, identity source down
  4401: "token", // token missing, malformed, forged or expired
  4403: "forbidden", // unknown or disabled user
  4408: "backoff", // no answer to the server's pings
  4409: "backoff", // this socket's session was resumed by another socket (on one this client replaced, never seen)
  4429: "crowded", // this user has too many sockets open (other tabs): back off, from a longer first wait
});
const MESSAGE_TOO_BIG = 1009;
// Back online or to the tab: a socket this quiet is asked at once whether it still works (a PING).
const WAKE_QUIET_MS = 1000;
/** What the server answers each message with (or an ERROR naming no channel), in the order they were sent. */
const ANSWER_TO = Object.freeze({ PING: "PONG", SUBSCRIBE: "SUBSCRIBED", UNSUBSCRIBE: "UNSUBSCRIBED" });
/** The largest message a client may send, in UTF-8 bytes: the server closes with 1009 beyond it. */
export const MAX_MESSAGE_BYTES = 64 * 1024;
/** The most channels one SUBSCRIBE or UNSUBSCRIBE may name: the server refuses the whole message beyond it. */
const MAX_CHANNELS_PER_MESSAGE = 200;
/**
 * What a channel name can be at all: printable ASCII, at most relay.channels.MAX_CHANNEL_CHARS (200)
 * characters (a test keeps the two equal). Any other name is refused here, alone: one the server cannot
 * even read (an unpaired surrogate) makes it refuse the whole message, and the channels sent with it;
 * 200 names of this length always fit in one message.
 */
const POSSIBLE_CHANNEL = /^[\x20-\x7e]{1,200}$/;

function isPossibleChannel(name) {
  return typeof name === "string" && POSSIBLE_CHANNEL.test(name);
}

function* inChunks(names) {
  for (let at = 0; at < names.length; at += MAX_CHANNELS_PER_MESSAGE) yield names.slice(at, at + MAX_CHANNELS_PER_MESSAGE);
}

/**
 * Options of {@link RealtimeClient} (any subset may be given to the constructor or getClient).
 * @typedef {Object} RealtimeOptions
 * @property {string} authUrl where to GET `{wsUrl, token}` before each connection attempt
 * @property {number} minDelayMs first back-off window, ms
 * @property {number} maxDelayMs back-off cap, ms
 * @property {number} minRetryMs the least time between two attempts, ms
 * @property {number} restartJitterMs after a 1012, reconnect within this many ms
 * @property {number} maxQuickRestarts 1012s in a row before backing off like any failure
 * @property {number} idleMs send an application PING after this long without a message
 * @property {number} pongTimeoutMs treat the socket as dead if nothing answers that PING within this
 * @property {number} maxAuthFailures 4401s with fresh tokens in a row before giving up ("unauthorized")
 * @property {number} stableMs a connection open at least this long resets the backoff when it closes
 * @property {?Element} target the element that receives the `realtime:*` DOM events (default document.body)
 * @property {?{epoch: string, offset: number}} since the stream's position the page was rendered at
 *   (base.html puts it on `<body>` as `data-realtime-epoch` and `data-realtime-offset`): the first
 *   connection's SUBSCRIBEs ask for what was broadcast after it, so nothing sent between the render
 *   and the subscription is missed; if it cannot be replayed, `realtime:resync` says so
 */

/** @type {Readonly<RealtimeOptions>} */
export const DEFAULTS = Object.freeze({
  authUrl: "/api/ws/auth",
  minDelayMs: 500, // first backoff window
  maxDelayMs: 20000, // backoff cap
  minRetryMs: 250, // never more than 4 attempts a second, whatever happens
  restartJitterMs: 1000, // after 1012: reconnect within this, spread so a deploy is not a stampede
  maxQuickRestarts: 3, // 1012s in a row without getting in: then back off like any failure
  idleMs: 25000, // nothing heard for this long: send an application PING
  pongTimeoutMs: 10000, // and if that gets no answer, the socket is dead
  maxAuthFailures: 5, // rejected fresh tokens in a row before giving up
  stableMs: 30000, // a connection that lasted this long starts the backoff over when it ends
  target: null, // element that receives the DOM events (document.body)
  since: null, // {epoch, offset}: the stream's position the page was rendered at (see the option's doc)
});

/**
 * A message as the server sends it: `{type, data}`; broadcasts also carry `id` and `offset`,
 * and a channel's last value `last: true`.
 * @typedef {{type: string, data: *, id?: string, offset?: number, last?: boolean}} RealtimeMessage
 */

/**
 * The connection status, as {@link RealtimeClient#onStatus} reports it.
 * @typedef {"idle"|"connecting"|"open"|"reconnecting"|"offline"|"unauthorized"|"error"} RealtimeStatus
 */

/**
 * One WebSocket to the realtime service, kept alive and resumed across reconnects.
 * Use {@link getClient} for the tab's shared one rather than constructing your own.
 */
export class RealtimeClient {
  /** @param {Partial<RealtimeOptions>} [options] */
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options };
    this.status = "idle";
    this.ws = null;
    this.refs = new Map(); // channel -> number of subscribers on the page
    this.wantsLast = new Map(); // channel -> number of its subscribers that asked for {last: true}
    this.position = null; // {clientId, epoch, offset}: where to resume from, once connected
    this.resyncListeners = new Set();
    this.messageListeners = new Set();
    this.statusListeners = new Set();
    this.attempt = 0; // consecutive failed attempts, for backoff
    this.authFailures = 0; // consecutive 4401 closes
    this.restarts = 0; // consecutive 1012 closes
    this.retries = []; // the last 20 decisions {code, action, delayMs, windowMs}, for diagnostics and tests
    this.everOpened = false;
    this.delayed = false; // the first connection did not come at the first attempt (a retry, or offline)
    this.shownAhead = new Map(); // id -> offset of last values shown ahead of the position
    this.since = positionOf(this.options.since); // the page's render position, until the first CONNECTED
    this.socketFrom = 0; // where this socket's replays may start: CONNECTED's offset, or the render's once replayed from
    this.revoked = new Set(); // channels the server ended on a socket (the user's access changed), until taken again
    this.sinceOf = new Map(); // channel -> {epoch, offset}: subscribe's `since` for a channel new to the page, until asked
    // {waiting, frames, missed, from, ahead, resumed, below, channels, earlier, missedEarlier, reason, sent,
    // asked, probes}: broadcasts held until the SUBSCRIBEs `since` are answered (below, channels: a hold
    // that began on an open socket, see _subscribeLive; earlier, missedEarlier: a resume's channels asked
    // since the position it resumed from, and those of them not replayed, see _connected; sent, asked,
    // probes: how many SUBSCRIBEs it sent, when the first left or the last PING asked after them, and
    // those PINGs, see _checkHold)
    this.holding = null;
    this.endedInHold = false; // the last socket ended while broadcasts were held (see _connected)
    this.sentAhead = []; // the types of the messages sent from listeners of "open", ahead of the first SUBSCRIBEs
    this.countingAhead = false;
    this.connectedAt = 0; // when the open socket got CONNECTED (0: none)
    this.unanswered = new Map(); // channel -> SUBSCRIBEs of it with no SUBSCRIBED or ERROR back yet
    this.toAsk = new Set(); // channels to subscribe at the end of this task, in one SUBSCRIBE...
    this.toDrop = new Set(); // ...and to unsubscribe, in one UNSUBSCRIBE
    this.flushQueued = false;
    this.refused = new Set(); // channels the server refused with an ERROR naming them (not held)
    this.stopped = true;
    this.fetching = false; // a token request is in flight
    this.retryTimer = null;
    this.watchdog = null;
    this.admitTimer = null; // a socket that has not had its CONNECTED yet is given up after idleMs + pongTimeoutMs
    this.lastHeard = 0;
    this.pingSentAt = 0;
    this.pingsSent = 0;
    this.pongsSeen = 0;
    this.stats = { authFetches: 0, sockets: 0 }; // for diagnostics and tests
    this._onOnline = () => this._wake();
    this._onOffline = () => this._goOffline();
    this._onVisible = () => document.visibilityState === "visible" && this._wake();
    // Back to a tab that was told "unauthorized" (its user may have signed in again elsewhere): once more.
    this._onReturn = () => document.visibilityState === "visible" && this.status === "unauthorized" && this._tryAgain();
  }

  // -- public API ----------------------------------------------------------

  /**
   * Connect (fetching a token first), and keep connecting until {@link RealtimeClient#stop}.
   * @returns {RealtimeClient} this
   */
  start() {
    if (!this.stopped) return this;
    this.stopped = false;
    this._forgetReturn();
    window.addEventListener("online", this._onOnline);
    window.addEventListener("offline", this._onOffline);
    document.addEventListener("visibilitychange", this._onVisible);
    this._connect();
    return this;
  }

  /**
   * Stop reconnecting (an open socket is left to close by itself).
   * @param {RealtimeStatus} [status] the status to report from now on
   */
  stop(status = "idle") {
    this.stopped = true;
    this._forgetReturn();
    clearTimeout(this.retryTimer);
    this._socketEnded();
    window.removeEventListener("online", this._onOnline);
    window.removeEventListener("offline", this._onOffline);
    document.removeEventListener("visibilitychange", this._onVisible);
    if (this.ws) this._dropSocket(1000, "client stopped");
    this._setStatus(status);
  }

  /**
   * Subscribe to channels; each call must be matched by one unsubscribe. What the calls of one task
   * ask for leaves at its end, as one message (see {@link RealtimeClient#_flush}).
   * `{last: true}`: the server first sends the latest message of each channel
   * (within its last-value TTL), marked `last: true`, and does so again after
   * every resync. A channel the page already holds is asked for again, so a
   * second subscriber gets the current value too (the others get it as well,
   * marked `last: true`).
   * @param {string[]} names channel names (see {@link channels})
   * @param {{last?: boolean, ask?: boolean, since?: ?{epoch: string, offset: number}}} [options] `ask:
   *   false`: for a channel already held, only remember that its last value is wanted (on later
   *   resubscriptions), without asking for it now. `since`: the stream's position the caller's view of
   *   these channels was read at (a fragment's render, as `<body>`'s for the page): for a channel the
   *   page does not hold yet, what was broadcast to it after that position is delivered too, or
   *   `realtime:resync` names it when that cannot be (the stream is gone since, a position from before
   *   this socket's start, the socket dropped before the replay came). Without it, the channel's
   *   broadcasts are delivered from the moment the server has the SUBSCRIBE.
   */
  subscribe(names, { last = false, ask = true, since = null } = {}) {
    const from = positionOf(since);
    for (const name of names) {
      const count = this.refs.get(name) || 0;
      this.refs.set(name, count + 1);
      if (last) countUp(this.wantsLast, name);
      if (count === 0 || (last && ask)) this.toAsk.add(name);
      if (count === 0 && from) this._askFrom(name, from);
    }
    this._flushSoon();
  }

  /**
   * Ask again for the last value of channels the page holds with `last`: a view of them that may have
   * fallen behind (a fragment re-rendered from an older state) is brought up to date. Every subscriber
   * of those channels gets it, marked `last: true`. Channels not held with `last` are left alone.
   * @param {string[]} names
   */
  askLast(names) {
    for (const name of names) if (this.refs.has(name) && this.wantsLast.has(name)) this.toAsk.add(name);
    this._flushSoon();
  }

  /** A channel new to the page is to be asked since `from` (the oldest such position asked wins). */
  _askFrom(name, from) {
    if (!this.position) {
      // Not connected yet (or starting over): the first connection asks every channel since one
      // position. The older one covers both (a broadcast may be shown twice, never missed).
      if (!this.since || (this.since.epoch === from.epoch && from.offset < this.since.offset)) this.since = from;
      return;
    }
    const had = this.sinceOf.get(name);
    if (!had || had.epoch !== from.epoch || from.offset < had.offset) this.sinceOf.set(name, from);
  }

  /**
   * Undo one {@link RealtimeClient#subscribe} of these channels, with the same `last`; the server is
   * told when the last subscriber of a channel on the page is gone.
   * @param {string[]} names
   * @param {{last?: boolean}} [options] `last: true` undoes a subscribe with `{last: true}`: once no
   *   subscriber of a channel wants its last value, resubscriptions stop asking for it
   */
  unsubscribe(names, { last = false } = {}) {
    for (const name of names) {
      const count = this.refs.get(name) || 0;
      if (count <= 1) {
        if (count === 1) this.toDrop.add(name);
        this.refs.delete(name);
        this.wantsLast.delete(name);
        this.refused.delete(name);
        this.revoked.delete(name);
        this.sinceOf.delete(name); // not asked yet: a later plain subscribe must not replay from it
      } else {
        this.refs.set(name, count - 1);
        if (last) countDown(this.wantsLast, name);
      }
    }
    this._flushSoon();
  }

  /**
   * Send a message now if the socket is open (nothing is queued while it is not).
   * @param {{type: string, data?: *}} message
   * @returns {boolean} whether it was sent (false: not open, or over {@link MAX_MESSAGE_BYTES})
   */
  send(message) {
    // Messages leave in the order they were asked for; but not from a listener of "open": the
    // subscriptions asked there leave in a moment with the others, asking `since` (_connected).
    if (!this.countingAhead) this._flush();
    if (this.status !== "open" || !this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    const text = JSON.stringify(message);
    if (new TextEncoder().encode(text).length > MAX_MESSAGE_BYTES) {
      // The server would close the socket with 1009: refuse here, and say so.
      console.error(`realtime: not sending a ${message && message.type} message over ${MAX_MESSAGE_BYTES} bytes`);
      return false;
    }
    this.ws.send(text);
    if (message && message.type === "PING") this.pingsSent += 1; // its PONG is counted (see _ping)
    if (this.countingAhead) this.sentAhead.push(message && message.type);
    return true;
  }

  /**
   * Listen to every message (replayed ones after a resume included, in order).
   * @param {(message: RealtimeMessage) => void} listener
   * @returns {() => void} stops listening
   */
  onMessage(listener) {
    this.messageListeners.add(listener);
    return () => this.messageListeners.delete(listener);
  }

  /**
   * Called when what was missed could not be replayed (`recovered: false`, a server without history,
   * or channels subscribed while the socket was down: then `channels` names them, and only they
   * need refetching): refetch what the page shows. Also dispatched as `realtime:resync` on the target.
   * @param {(connected: {clientId: string, epoch?: string, offset?: number, reason?: string, channels?: string[]}) => void} listener
   * @returns {() => void} stops listening
   */
  onResync(listener) {
    this.resyncListeners.add(listener);
    return () => this.resyncListeners.delete(listener);
  }

  /**
   * Listen to status changes; called at once with the current status.
   * @param {(status: RealtimeStatus) => void} listener
   * @returns {() => void} stops listening
   */
  onStatus(listener) {
    this.statusListeners.add(listener);
    listener(this.status);
    return () => this.statusListeners.delete(listener);
  }

  get channels() {
    return [...this.refs.keys()];
  }

  // -- connecting ------------------------------------------------------------

  async _connect() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (this.stopped || this.ws || this.fetching) return;
    if (!navigator.onLine) return this._goOffline();
    this._setStatus(this.everOpened ? "reconnecting" : "connecting");

    // A fresh token for every attempt: the last one may have expired meanwhile.
    let auth;
    let giveUp = null;
    this.fetching = true;
    try {
      this.stats.authFetches += 1;
      // Bounded: a network that died without an "offline" event would leave the request waiting for
      // minutes, and every other way back in (online, the tab visible again) waits behind it.
      // (AbortController and a timer, not AbortSignal.timeout: Safari before 16 has no such thing.)
      const { idleMs, pongTimeoutMs } = this.options;
      const abort = new AbortController();
      giveUp = setTimeout(() => abort.abort(), idleMs + pongTimeoutMs);
      const response = await fetch(this.options.authUrl, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "application/json" },
        signal: abort.signal,
      });
      if (response.status === 401 || response.status === 403) return this._unauthorized();
      if (!response.ok) throw new Error(`token endpoint answered ${response.status}`);
      auth = await response.json();
    } catch (error) {
      return this._retry(); // the token endpoint is unreachable or failing
    } finally {
      clearTimeout(giveUp);
      this.fetching = false;
    }
    if (this.stopped || this.ws) return;

    let ws;
    try {
      let url = `${auth.wsUrl}?token=${encodeURIComponent(auth.token)}`;
      const at = this.position;
      if (at) url += `&resume=${encodeURIComponent(at.clientId)}&epoch=${encodeURIComponent(at.epoch)}&offset=${at.offset}`;
      ws = new WebSocket(url);
    } catch (error) {
      return this._retry();
    }
    this.stats.sockets += 1;
    this.ws = ws;
    this.pingsSent = 0; // PINGs sent on this socket, and PONGs back: see _checkHold
    this.pongsSeen = 0;
    ws.onmessage = (event) => this._onSocketMessage(ws, event);
    ws.onclose = (event) => this._onSocketClose(ws, event);
    // The watchdog starts with CONNECTED: a socket whose network died before it would otherwise wait
    // forever, since nothing is sent on it. Twice as long before the 101 (a reload storm's clients may
    // wait their turn in the server's backlog), then the usual wait for CONNECTED.
    const { idleMs, pongTimeoutMs } = this.options;
    this.admitTimer = setTimeout(() => this._abandon(ws, "no 101"), 2 * (idleMs + pongTimeoutMs));
    ws.onopen = () => {
      if (ws !== this.ws) return;
      clearTimeout(this.admitTimer);
      this.admitTimer = setTimeout(() => this._abandon(ws, "no CONNECTED"), idleMs + pongTimeoutMs);
    };
  }

  _onSocketMessage(ws, event) {
    if (ws !== this.ws) return;
    this.lastHeard = Date.now();
    this.pingSentAt = 0;
    let message = null;
    try {
      message = JSON.parse(event.data);
    } catch (error) {
      // not JSON: unreadable, as a message without a type is (below)
    }
    if (!message || typeof message.type !== "string") return this._unreadable(ws, event.data);
    // The server's own frames carry no id; every broadcast has one (its type may be anything, even
    // CONNECTED or PONG: a producer chose it).
    if (typeof message.id === "string") {
      if (this.holding) return void this.holding.frames.push(message);
      if (!this._firstTime(message)) return;
    } else if (message.type === "CONNECTED") {
      this._admitted(message.data || {});
    } else if (message.type === "SUBSCRIBED") {
      this._subscribed(message.data || {}, this._takeAnswerAhead("SUBSCRIBED"));
    } else if (message.type === "ERROR" && message.data && typeof message.data.channel === "string") {
      this._refusedOne(message.data.channel, message.data);
    } else if (message.type === "ERROR" && this.holding && !(message.data && message.data.code === "rate_limited")) {
      // A SUBSCRIBE refused whole (answered in order, in place of its SUBSCRIBED): nothing replayed.
      // (Not rate_limited, which answers nothing: the close that follows ends the socket, and the wait.)
      if (!this._takeAnswerAhead("ERROR")) this._subscribed({ recovered: false, reason: "not_replayed" });
    } else if (message.type === "PONG") {
      if (this._onPong(ws) || !this._sameStream(message.data)) return;
      // Not while broadcasts are held: they are below its position, and would look already seen.
      if (!this._takeAnswerAhead("PONG") && !this.holding) this._caughtUp(message.data);
      return;
    } else if (message.type === "UNSUBSCRIBED") {
      this._takeAnswerAhead("UNSUBSCRIBED"); // or one the server sent unasked (the user's access changed)
    }
    if (ws !== this.ws) return; // the answer made the socket untrusted (_sameStream): not shown
    this._show(message);
  }

  /**
   * A frame that is not a message (not JSON, no `type`): the server never sends one, so something
   * between it and us mangled it. It may have been a broadcast, or the answer a hold waits for: the
   * socket cannot be trusted. Resume on a new one, which replays what this one was sent after the
   * position (the mangled frame too: it moved nothing). Something that mangles every time makes this
   * a loop, but a loud one, in the backoff: never a frame gone in silence.
   */
  _unreadable(ws, data) {
    const what = typeof data === "string" ? `${data.length} characters` : "binary";
    console.error(`realtime: a frame that is not a message (${what}) came on the socket; resuming on a new one`);
    this._abandon(ws, "unreadable frame");
  }

  /**
   * Whether an answer of this type (PONG, SUBSCRIBED, UNSUBSCRIBED, an ERROR naming no channel) is to a
   * message sent ahead of the first SUBSCRIBEs `since` (a listener of "open" may send one), not to one of
   * them: the server answers in order, so those come first. If so, it is taken off the list.
   */
  _takeAnswerAhead(type) {
    const ahead = this.holding ? this.holding.ahead : [];
    if (!ahead.length || (type !== "ERROR" && type !== ANSWER_TO[ahead[0]])) return false;
    ahead.shift();
    return true;
  }

  _show(message) {
    notifyAll(this.messageListeners, message, "message");
    const target = this.options.target || document.body;
    target.dispatchEvent(new CustomEvent("realtime:message", { detail: message }));
    target.dispatchEvent(new CustomEvent(`realtime:${message.type}`, { detail: message }));
  }

  /**
   * The broadcasts held while the first SUBSCRIBEs' replay was on its way, in offset order: a live
   * one (for the user, their role, a channel answered already) may have come before older replayed
   * ones, and would have made them look already seen.
   */
  _release() {
    const held = this.holding;
    this.holding = null;
    if (!held) return;
    const ordered = held.frames.map((message, index) => ({ message, index }));
    ordered.sort((a, b) => (a.message.offset ?? Infinity) - (b.message.offset ?? Infinity) || a.index - b.index);
    for (const { message } of ordered) {
      // At or below `below`: replayed for a channel the page did not hold (see _subscribeLive).
      const replayedBelow = held.below !== undefined && !message.last && message.offset <= held.below;
      if (replayedBelow || this._firstTime(message)) this._show(message);
    }
  }

  /** Whether a broadcast is to be shown: each once, in offset order (false: already processed). */
  _firstTime(message) {
    if (typeof message.offset !== "number" || !this.position) return true;
    if (message.last) {
      // An old broadcast resent on purpose: it does not move the position, but if it is ahead of
      // it, a replay after a drop brings it again as an ordinary frame: remember it was shown.
      if (message.offset > this.position.offset) {
        if (this.shownAhead.size >= 500) this.shownAhead.delete(this.shownAhead.keys().next().value); // oldest
        this.shownAhead.set(message.id, message.offset);
      }
      return true;
    }
    if (message.offset <= this.position.offset) return false;
    const shown = this.shownAhead.delete(message.id);
    this._advance(message.offset);
    return !shown;
  }

  /**
   * A PONG carries the stream's position, with every broadcast for this client up to it sent before
   * the PONG: a page whose channels are quiet resumes from there, not from an offset the history has
   * dropped since (it would be told `history_gone` and refetch everything after a deploy).
   */
  _caughtUp(data) {
    const at = this.position;
    if (at && data && data.epoch === at.epoch && typeof data.offset === "number") this._advance(data.offset);
  }

  /**
   * Whether a PONG's or SUBSCRIBED's stream is the page's. If not, the stream was reset under this
   * socket (its history lost): the server closes such sockets with 1012 "stream reset" first, so this is
   * defence in depth. Broadcasts carry no epoch, and the new stream's low offsets would look already
   * seen, dropped in silence: the socket is abandoned, and the page resumes on a new one, which is told
   * `epoch_changed` and refetches.
   */
  _sameStream(data) {
    const at = this.position;
    if (!at || !data || typeof data.epoch !== "string" || !data.epoch || data.epoch === at.epoch) return true;
    console.warn(`realtime: the server's stream is no longer the one this page follows; resuming on a new socket`);
    this._abandon(this.ws, "stream reset");
    return false;
  }

  _advance(offset) {
    if (offset <= this.position.offset) return;
    this.position.offset = offset;
    for (const [id, ahead] of this.shownAhead) if (ahead <= offset) this.shownAhead.delete(id);
  }

  _admitted(data) {
    // A first connection that did not come at the first attempt came well after the page was rendered:
    // what was broadcast meanwhile is missing from it, as after a reconnect.
    const reconnect = this.everOpened || this.delayed;
    // Not the backoff (attempt), nor the quick restarts: a server that admits and then closes at once,
    // again and again (1013, 1011, 1008, 1012), must see this client slow down. Both start over once a
    // connection lasted (_socketEnded).
    clearTimeout(this.admitTimer);
    this.connectedAt = Date.now();
    this.authFailures = 0;
    this.everOpened = true;
    // Before _connected: send() needs it (its listeners cannot throw past here). What they send leaves
    // ahead of the first SUBSCRIBEs, and is answered ahead of them (counted: _takeAnswerAhead).
    this.sentAhead = [];
    this.countingAhead = true;
    this._setStatus("open");
    this.countingAhead = false;
    this._startWatchdog();
    this._connected(data, reconnect);
  }

  _subscribed(data, answersAhead = false) {
    if (!this._sameStream(data)) return; // before anything held is shown
    const names = list(data.channels);
    // Only an answer to a SUBSCRIBE `since` says `recovered`: a plain one's, sent after those, is not waited for.
    const held = answersAhead || !("recovered" in data) ? null : this.holding;
    if (held) {
      if (data.recovered !== true) {
        // The SUBSCRIBE since the resumed-from position of channels the restored session lacked (see
        // _connected) concerns them alone: only they are refetched, not the whole page.
        const theirs = held.earlier && names.length > 0 && names.every((name) => held.earlier.includes(name));
        if (theirs) held.missedEarlier = [...(held.missedEarlier || []), ...names];
        else held.missed = data.reason || "not_replayed";
        held.reason = data.reason || "not_replayed";
      }
      // As the server does: a replay from the render's position makes the socket's start that position.
      else if (!held.channels) this.socketFrom = Math.min(this.socketFrom, held.from.offset);
      if ((held.waiting -= 1) <= 0) {
        this._release(); // every SUBSCRIBE `since` is answered: the replay is all here
        // Not replayed (the page was rendered on a worker gone since, or too long ago): refetch all of
        // it, as after a reconnect (also what came for the user, their role and clinic before CONNECTED).
        if (held.missed) {
          // A hold that began on an open socket (see _subscribeLive) missed only what its channels did.
          const scope = held.channels ? { channels: held.channels } : {};
          this._resync({ clientId: this.position.clientId, epoch: data.epoch, reason: held.missed, ...scope });
        } else if (held.missedEarlier) {
          const channels = held.missedEarlier;
          this._resync({ clientId: this.position.clientId, epoch: data.epoch, reason: held.reason, channels });
        }
      }
    }
    // As a PONG's: every broadcast up to it for this client came before, and those of a channel just
    // taken from before it are not coming (a resume would otherwise replay them, older than its last
    // value). Not while broadcasts are held: they are below it, and would look already seen.
    if (!this.holding) this._caughtUp(data);
    const granted = names.filter((name) => {
      this._answered(name);
      this.revoked.delete(name);
      return this.refused.delete(name);
    });
    // Refused before (the user's role or clinic changed, and changed back): what the page shows of
    // them is from before, and nothing was replayed for them.
    if (granted.length) this._resync({ reason: "granted", channels: granted });
  }

  /** An ERROR naming a channel: refused, or dropped since (the user's role or clinic changed). */
  _refusedOne(name, data = {}) {
    // No SUBSCRIBE of it awaits an answer: not a refusal but a revocation (the user's role or clinic
    // changed; the server ends the subscription and says UNSUBSCRIBED next). What the page shows of it
    // will not move again: tell it, by channel, or it would stay frozen under "Live".
    // Refused again after that (a reconnect that subscribes anew): said again, as a resync for the whole
    // page came in between.
    const revoked =
      this.refs.has(name) &&
      data.code === "forbidden_channel" &&
      (!this.unanswered.get(name) || this.revoked.has(name));
    this._answered(name);
    if (this.refs.has(name)) this.refused.add(name);
    if (revoked) {
      this.revoked.add(name);
      this._resync({ reason: "revoked", channels: [name] });
    }
  }

  /** One SUBSCRIBE of this channel was answered (a plain one's answer says nothing of a `last` one's). */
  _answered(name) {
    countDown(this.unanswered, name);
  }

  _connected(data, reconnect) {
    const endedInHold = this.endedInHold; // the socket before ended with broadcasts held (_socketEnded)
    this.endedInHold = false;
    let since = null; // the render's position, when this first connection's SUBSCRIBEs ask from it
    let from = null; // where its SUBSCRIBEs ask from: the render's position, or CONNECTED's
    const rendered = this.since;
    this.since = null; // the page's position serves its first connection; later ones resume
    this.sinceOf.clear(); // a channel given one while the socket was down is asked as the others (and refetched)
    if (data.recovered !== true) this.shownAhead.clear(); // a new position: nothing is ahead of it yet
    // Either way what this socket must be asked joins what the page asked since the status changed (a
    // listener of "open" runs just before this), and leaves in one flush.
    if (typeof data.epoch !== "string" || typeof data.offset !== "number") {
      this.position = null; // this server keeps no history: nothing to resume
    } else if (data.recovered === true) {
      // Restored: the missed broadcasts follow, then live ones. Keep our offset until they arrive.
      this.position = { clientId: data.clientId, epoch: data.epoch, offset: this.position.offset };
      const restored = new Set(list(data.channels));
      // Held by the session, but no longer allowed (the user's role or clinic changed while away): the
      // ERRORs saying so come after this frame, too late for the decision below.
      for (const name of list(data.refused)) if (this.refs.has(name)) this.refused.add(name);
      const lacking = [...this.refs.keys()].filter((name) => !restored.has(name));
      // The replay covered the channels the session held. One it lacks that the server did not refuse
      // may have missed broadcasts (a refused one has nothing to miss). If the socket we come back from
      // had it (its SUBSCRIBE answered: the worker we left had not saved the change yet, or died first),
      // every broadcast of it up to our position reached us: it is asked since that position, and what it
      // missed is replayed with the rest. Else (its SUBSCRIBE never left, went down with the socket
      // unanswered, or is only now on its way: a listener of "open" asked for it) there is no position it
      // is whole from: it is asked since CONNECTED and the page refetches it.
      // Not if that socket ended while broadcasts were held: the position stayed behind where its
      // channels were taken (it moves to a SUBSCRIBED's only once nothing is held), so asking from it
      // would replay what they never had to (their pages refetched them, or read them since).
      const away = lacking.filter((name) => !this.refused.has(name));
      const isHeld = (name) => !endedInHold && !this.unanswered.has(name) && !this.toAsk.has(name);
      const held = away.filter(isHeld);
      const unheld = away.filter((name) => !isHeld(name));
      // Held all along, but a subscriber asked for its last value and no answer came back.
      const again = [...restored].filter((name) => this.unanswered.has(name) && this.wantsLast.has(name));
      this.unanswered.clear(); // those SUBSCRIBEs went with the socket; the ones asked again count from here
      // Held by the session, but refused on the last socket (a drop the dying worker never saved, and
      // access given back since): its broadcasts meanwhile were not replayed.
      const regained = [...restored].filter((name) => this.refused.delete(name));
      // ...and its subscribers that show the channel's state from its last value are told to refetch
      // (below), and wait for that value: ask for it.
      const stateless = regained.filter((name) => this.wantsLast.has(name) && !again.includes(name));
      for (const name of [...lacking, ...again, ...stateless]) if (!held.includes(name)) this.toAsk.add(name);
      for (const name of restored) if (!this.refs.has(name)) this.toDrop.add(name); // dropped while we were away
      // Those asked again ask since CONNECTED, as on any other connection (below); the resume's replay,
      // which follows CONNECTED, is held with what they bring, and put in order with it.
      this.socketFrom = data.offset;
      const resumedFrom = { epoch: data.epoch, offset: this.position.offset };
      this._askSince({ epoch: data.epoch, offset: data.offset }, true, held.length ? { held, resumedFrom } : null);
      if (unheld.length) this._resync({ ...data, reason: "not_restored", channels: unheld });
      if (regained.length) this._resync({ ...data, reason: "granted", channels: regained });
      return;
    } else {
      // The page's first connection, in the stream it was rendered in: its SUBSCRIBEs ask for what was
      // broadcast since the render (the broadcasts held meanwhile are put in order with it).
      since = rendered && rendered.epoch === data.epoch ? rendered : null;
      if (rendered && !since) reconnect = true; // rendered in a stream that is gone since
      // Any other: since CONNECTED. A channel's broadcast between the admission and its SUBSCRIBE would
      // otherwise reach neither this socket nor a refetch that read the page's state just before it.
      from = since || { epoch: data.epoch, offset: data.offset };
      this.position = { clientId: data.clientId, epoch: data.epoch, offset: from.offset };
      this.socketFrom = data.offset; // lowered to the render's once its replay is answered (_subscribed)
    }
    this.refused.clear(); // every channel is asked again, and the page refetches them all at once
    this.unanswered.clear();
    this.toDrop.clear(); // a new session holds nothing
    for (const name of this.refs.keys()) this.toAsk.add(name);
    if (!from) {
      this._flush(); // no history: nothing to ask since
    } else if (!this._askSince(from)) {
      if (data.offset > this.position.offset) reconnect = true; // nothing subscribed: nothing to replay it with
    } else if (since) {
      return; // what was missed comes replayed, or SUBSCRIBED says it cannot (see _subscribed)
    }
    // A reconnect that is not a recovery missed whatever was sent meanwhile, with or without history:
    // every page must refetch its state.
    if (reconnect) this._resync(data);
  }

  /**
   * Send what is to be asked, each SUBSCRIBE `since` `from`, and hold broadcasts until they are all
   * answered (_subscribed). Whether any was sent: if not, nothing is held.
   * @param {{epoch: string, offset: number}} from
   * @param {boolean} [resumed] on a resumed session (see _socketEnded)
   * @param {?{held: string[], resumedFrom: {epoch: string, offset: number}}} [earlier] channels the
   *   restored session lacks though the socket before had them: asked since the position it resumed from
   */
  _askSince(from, resumed = false, earlier = null) {
    this.holding = { waiting: 0, frames: [], missed: null, from, ahead: this.sentAhead, resumed };
    if (earlier) this.holding.earlier = earlier.held; // a replay it misses concerns only them (_subscribed)
    this._flush(from, earlier);
    if (this.holding.waiting > 0) return true;
    this._release(); // nothing held yet: nothing shown
    return false;
  }

  _resync(data) {
    if (data.reason) console.info(`realtime: resynchronising (${data.reason})`);
    notifyAll(this.resyncListeners, data, "resync");
    const target = this.options.target || document.body;
    target.dispatchEvent(new CustomEvent("realtime:resync", { detail: data }));
  }

  // One UNSUBSCRIBE and one SUBSCRIBE (per flavour) for all the subscribe and unsubscribe calls of a
  // task: an htmx swap that brings or removes 50 fragments would otherwise send 50 messages, over the
  // server's burst of 40, and it closes the socket with 1008.
  _flushSoon() {
    if (this.flushQueued || !(this.toAsk.size || this.toDrop.size)) return;
    this.flushQueued = true;
    queueMicrotask(() => this._flush());
  }

  /**
   * Send what this task's subscribe and unsubscribe calls left for the end of it.
   * @param {?{epoch: string, offset: number}} [since] the SUBSCRIBEs ask for what came after it (and
   *   broadcasts are held until they are answered: see _connected)
   * @param {?{held: string[], resumedFrom: {epoch: string, offset: number}}} [earlier] asked since
   *   their own position, ahead of the others (see _askSince). Sent from here, after what is to be
   *   asked is taken: a `send` flushes first, and would send the others without `since`.
   */
  _flush(since = null, earlier = null) {
    this.flushQueued = false;
    if (!this.toAsk.size && !this.toDrop.size && !earlier) return;
    // Each side only what is still true at the end of the task, so the two never name one channel
    // and their order does not matter: dropped then taken again is still held (the SUBSCRIBE answers
    // it, its last value too), taken then dropped is not (the UNSUBSCRIBE removes nothing).
    const drop = [...this.toDrop].filter((name) => !this.refs.has(name) && isPossibleChannel(name));
    const ask = [];
    for (const name of this.toAsk) {
      if (!this.refs.has(name)) continue;
      if (isPossibleChannel(name)) ask.push(name);
      else this._refusedHere(name);
    }
    this.toDrop.clear();
    this.toAsk.clear();
    for (const some of inChunks(drop)) this.send({ type: "UNSUBSCRIBE", data: { channels: some } });
    if (earlier) this._sendSubscribe(earlier.held, earlier.resumedFrom);
    const open = this.position && this.ws && this.ws.readyState === WebSocket.OPEN && this.status === "open";
    if (!since && open && ask.some((name) => this.sinceOf.has(name))) return this._subscribeLive(ask);
    for (const name of ask) this.sinceOf.delete(name);
    this._sendSubscribe(ask, since);
  }

  /**
   * Subscribe on an open socket, where some channels were given a `since` (subscribe's option: a
   * fragment's render). Those are asked since the oldest of their positions, and broadcasts are held
   * until that is answered, as on a connection's first SUBSCRIBEs. What it replays from before the
   * page's position is of channels the page did not hold (the server sends only what this socket was
   * not sent): shown, though below the position (`below`), which it does not move. A position from
   * before this socket's own start cannot be asked (the server would repeat what the socket's first
   * replay, or the socket before it, brought), nor one from another stream: those channels are
   * subscribed with the others, plainly, and the page told to refetch them.
   * @param {string[]} ask
   */
  _subscribeLive(ask) {
    const at = this.position;
    const early = new Map(); // channel -> the position its view was read at
    const plain = [];
    const cannot = [];
    for (const name of ask) {
      const from = this.sinceOf.get(name);
      this.sinceOf.delete(name);
      if (from && from.epoch === at.epoch && from.offset >= this.socketFrom) {
        early.set(name, from.offset);
      } else {
        plain.push(name);
        if (from) cannot.push(name);
      }
    }
    if (early.size) {
      const oldest = Math.min(...early.values());
      if (!this.holding) {
        // Its own hold: `channels` says which a missed replay concerns. One joined (a connection's first
        // SUBSCRIBEs still on their way) resyncs the whole page if its replay is missed, these included.
        const from = { epoch: at.epoch, offset: at.offset };
        this.holding = { waiting: 0, frames: [], missed: null, from, ahead: [], resumed: true, channels: [] };
      }
      const hold = this.holding;
      if (oldest < at.offset) hold.below = Math.max(hold.below ?? -1, at.offset);
      if (hold.channels) hold.channels.push(...early.keys());
      this._sendSubscribe([...early.keys()], { epoch: at.epoch, offset: oldest });
      if (hold.waiting <= 0) this._release(); // nothing was sent: nothing to wait for
    }
    this._sendSubscribe(plain, null);
    if (cannot.length) {
      this._resync({ clientId: at.clientId, epoch: at.epoch, reason: "not_replayed", channels: cannot });
    }
  }

  /** A name no channel can have (see POSSIBLE_CHANNEL): never sent, counted refused as the server would. */
  _refusedHere(name) {
    if (this.refused.has(name)) return; // said already (a resume asks again for what it did not restore)
    this.refused.add(name);
    console.error(`realtime: no channel can be named ${JSON.stringify(String(name)).slice(0, 80)}; not subscribed`);
  }

  _sendSubscribe(names, since) {
    const last = names.filter((name) => this.wantsLast.has(name));
    const plain = names.filter((name) => !this.wantsLast.has(name));
    const from = since ? { since: { epoch: since.epoch, offset: since.offset } } : {};
    for (const [group, flags] of [[plain, {}], [last, { last: true }]]) {
      for (const some of inChunks(group)) {
        // Not sent (no socket): the next CONNECTED sees it unanswered.
        const sent = this.send({ type: "SUBSCRIBE", data: { channels: some, ...flags, ...from } });
        if (sent && since) {
          const hold = this.holding;
          hold.waiting += 1;
          hold.sent = (hold.sent || 0) + 1;
          hold.asked = hold.asked || performance.now(); // see _checkHold
        }
        for (const name of some) countUp(this.unanswered, name);
      }
    }
  }

  _onSocketClose(ws, event) {
    if (ws !== this.ws) return;
    this.ws = null;
    this._socketEnded();
    if (this.stopped) return;
    const code = event.code;
    const action = CLOSE_ACTIONS[code] || "backoff"; // 1006 (network lost), 1001, anything new
    if (code === MESSAGE_TOO_BIG) {
      console.error("realtime: the server refused a message over its size limit (1009); it will not be resent");
    }
    if (action === "fatal") return this._fail(code, event.reason);
    if (action === "forbidden") return this._unauthorized();
    if (action === "token") {
      this.authFailures += 1;
      if (this.authFailures >= this.options.maxAuthFailures) return this._unauthorized();
      // The usual cause is a token that aged out while offline: fetch a fresh one at once.
      // If fresh tokens are refused too, back off like any other failure.
      if (this.authFailures === 1) return this._retryIn(code, "token", 0, 0);
    }
    if (action === "crowded") {
      // Not a storm: every tab of this user would retry at once. Start the backoff a few steps in.
      this.attempt = Math.max(this.attempt, 3);
      return this._retry(code);
    }
    if (action === "restart" && this.restarts < this.options.maxQuickRestarts) {
      this.restarts += 1;
      const { restartJitterMs, minRetryMs } = this.options;
      return this._retryIn(code, "restart", minRetryMs + Math.random() * (restartJitterMs - minRetryMs), restartJitterMs);
    }
    this._retry(code);
  }

  /** Every way a socket ends comes through here: the watchdog, and the backoff's fresh start. */
  _socketEnded() {
    // A connection ended before the replay of its SUBSCRIBEs `since` was all here. What was held is
    // dropped, not shown: a newer one would move the position past older ones the replay never brought.
    // A resume's position did not move meanwhile: the next connection resumes from it again. Otherwise
    // the next one is a first connection again, subscribing since the same position (the render's, or
    // the CONNECTED's its page refetched after: its session may hold none of the channels).
    if (this.holding) {
      const held = this.holding;
      this.endedInHold = true;
      if (!held.resumed) {
        this.since = held.from;
        this.position = null;
      }
      this.holding = null;
      // A hold that began on an open socket (_subscribeLive): the position did not move, and the next
      // connection resumes from it; but its channels' replay from before it never came: refetch them.
      if (held.channels && held.channels.length) this._resync({ reason: "not_replayed", channels: held.channels });
    }
    this._stopWatchdog();
    clearTimeout(this.admitTimer);
    if (this.connectedAt && Date.now() - this.connectedAt >= this.options.stableMs) {
      this.attempt = 0;
      this.restarts = 0;
    }
    this.connectedAt = 0;
  }

  /**
   * The server will not have us (signed out, the user disabled, fresh tokens refused): stop. But the
   * person may sign in again in another tab or window, and this tab would stay "unauthorized", its page
   * frozen, until reloaded: when they come back to it (the tab visible again, the window focused), try
   * once more, resuming where it stopped. One try each time, whatever it answers.
   */
  _unauthorized() {
    this.stop("unauthorized");
    window.addEventListener("focus", this._onReturn);
    document.addEventListener("visibilitychange", this._onReturn);
  }

  _tryAgain() {
    this.authFailures = 0;
    this.attempt = 0;
    this.start();
  }

  _forgetReturn() {
    window.removeEventListener("focus", this._onReturn);
    document.removeEventListener("visibilitychange", this._onReturn);
  }

  _fail(code, reason) {
    // Retrying unchanged would fail the same way: stop, and make it visible to whoever runs the page.
    console.error(
      `realtime: the server closed the connection with ${code} (${reason || "no reason"}): ` +
        "this client broke the WebSocket protocol. Not reconnecting; please report this as a bug.",
    );
    this.stop("error");
    const target = this.options.target || document.body;
    target.dispatchEvent(new CustomEvent("realtime:error", { detail: { code, reason } }));
  }

  _retry(code = null) {
    if (this.stopped) return;
    if (!navigator.onLine) return this._goOffline();
    const { minDelayMs, maxDelayMs, minRetryMs } = this.options;
    const window_ = Math.min(maxDelayMs, minDelayMs * 2 ** this.attempt);
    this.attempt += 1;
    // Full jitter: a restarted server sees its clients spread over the window, not all at once.
    this._retryIn(code, "backoff", Math.max(minRetryMs, Math.random() * window_), window_);
  }

  _retryIn(code, action, delayMs, windowMs) {
    this.delayed = true;
    this._setStatus(this.everOpened ? "reconnecting" : "connecting");
    this.retries.push({ code, action, delayMs, windowMs });
    if (this.retries.length > 20) this.retries.shift();
    this._schedule(delayMs);
  }

  _schedule(delayMs) {
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this._connect(), delayMs);
  }

  _wake() {
    // Back online, or the tab became visible: do not wait for the backoff timer. An open socket that has
    // been quiet may have died meanwhile (the laptop slept, the network changed, and a hidden tab's
    // timers ran once a minute at most): ask it now, not at the next idle check, up to idleMs away.
    if (this.stopped || this.status === "unauthorized") return;
    if (!this.ws) return void this._connect();
    if (this.status === "open" && !this.pingSentAt && Date.now() - this.lastHeard > WAKE_QUIET_MS) this._ping(this.ws);
  }

  _goOffline() {
    if (this.stopped) return;
    this.delayed = true;
    this._setStatus("offline");
    if (this.ws) this._dropSocket(4000, "browser offline");
    clearTimeout(this.retryTimer); // the "online" event restarts us
  }

  // -- dead-connection detection ---------------------------------------------

  _startWatchdog() {
    this._stopWatchdog();
    const tick = Math.max(250, Math.min(this.options.idleMs, this.options.pongTimeoutMs) / 4);
    this.watchdog = setInterval(() => this._checkAlive(), tick);
  }

  _stopWatchdog() {
    clearInterval(this.watchdog);
    this.watchdog = null;
    this.pingSentAt = 0;
  }

  _checkAlive() {
    const ws = this.ws;
    if (!ws || this.status !== "open") return;
    const now = Date.now();
    // Below 0: the clock was stepped back (after a sleep): ask now, or count the wait for a PONG afresh.
    const quiet = now - this.lastHeard;
    if (this.pingSentAt > now) this.pingSentAt = now;
    if (this.pingSentAt && now - this.pingSentAt > this.options.pongTimeoutMs) {
      this._abandon(ws, "no answer to ping");
    } else if (this._checkHold(ws)) {
      // (a PING asked whether a SUBSCRIBE's answer was lost)
    } else if (!this.pingSentAt && (quiet > this.options.idleMs || quiet < 0)) {
      this._ping(ws);
    }
  }

  /**
   * Broadcasts held for SUBSCRIBEs' answers for over idleMs + pongTimeoutMs: send a PING, and another
   * each idleMs + pongTimeoutMs while they are held (whether it sent one). The server answers in order,
   * so a PING's PONG comes after the answers to every SUBSCRIBE sent before it: if they are not all
   * here by then, one was lost on its way (a proxy), and broadcasts would be held for good on a socket
   * whose PONGs say it is alive (_onPong). A replay still arriving (megabytes on a slow link) only
   * delays the PONG, and is not cut for it. A PING lost too costs one round: the next one's PONG is
   * counted as its.
   * (Not the keep-alive's: pingSentAt is the idle check's, and a slow replay keeps the socket alive.)
   */
  _checkHold(ws) {
    const held = this.holding;
    if (!held || !held.asked) return false;
    if (performance.now() - held.asked <= this.options.idleMs + this.options.pongTimeoutMs) return false;
    held.asked = performance.now();
    if (!held.probes) held.probes = [];
    held.probes.push({ ping: this._sendPing(ws), answers: held.sent });
    return true;
  }

  /** A PONG: if it answers a PING of _checkHold's, and its SUBSCRIBEs are not all answered, abandon the socket. */
  _onPong(ws) {
    this.pongsSeen += 1;
    const held = this.holding;
    const probes = held && held.probes;
    let lost = false;
    while (probes && probes.length && probes[0].ping <= this.pongsSeen) {
      if (held.sent - held.waiting < probes.shift().answers) lost = true;
    }
    if (!lost) return false;
    // Resume on a new socket: it replays what was held (the position has not moved), and the
    // SUBSCRIBEs are asked again.
    console.warn("realtime: a SUBSCRIBE went unanswered; broadcasts were held meanwhile. Resuming on a new socket");
    this._abandon(ws, "no answer to SUBSCRIBE");
    return true;
  }

  _ping(ws) {
    this.pingSentAt = Date.now();
    this._sendPing(ws);
  }

  /** Send a PING; returns how many this socket has sent (its PONG is the one that makes as many). */
  _sendPing(ws) {
    ws.send(JSON.stringify({ type: "PING" }));
    return (this.pingsSent += 1);
  }

  /** Nothing came back on this socket: the network dropped it without telling us. Retry on a new one. */
  _abandon(ws, reason) {
    if (!ws || ws !== this.ws) return;
    this._dropSocket(4000, reason);
    this._retry(4000);
  }

  /** Close the current socket from our side; what follows is the caller's (its close event is ignored). */
  _dropSocket(code, reason) {
    const ws = this.ws;
    this.ws = null;
    this._socketEnded();
    ws.onclose = null;
    ws.close(code, reason);
  }

  _setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    notifyAll(this.statusListeners, status, "status");
  }
}

/** One more of `key` in a map of counts. */
function countUp(counts, key) {
  counts.set(key, (counts.get(key) || 0) + 1);
}

/** One fewer of `key` in a map of counts; none left is no entry. */
function countDown(counts, key) {
  const left = (counts.get(key) || 0) - 1;
  if (left > 0) counts.set(key, left);
  else counts.delete(key);
}

/** A position `{epoch, offset}` as the server writes it, or null. */
function positionOf(value) {
  if (!value || typeof value.epoch !== "string" || !value.epoch) return null;
  const offset = Number(value.offset);
  return Number.isSafeInteger(offset) && offset >= 0 ? { epoch: value.epoch, offset } : null;
}

/** A list the server sent, or none: a field of another type must not stop the client halfway. */
function list(value) {
  return Array.isArray(value) ? value : [];
}

/** Call each listener; one that throws is logged and cannot stop the others, or the client. */
function notifyAll(listeners, value, kind) {
  for (const listener of listeners) {
    try {
      listener(value);
    } catch (error) {
      console.error(`realtime ${kind} listener failed`, error);
    }
  }
}

let shared = null;

/**
 * The tab's one shared client (created and started on first use; later options are ignored).
 * @param {Partial<RealtimeOptions>} [options]
 * @returns {RealtimeClient}
 */
export function getClient(options = {}) {
  if (!shared) shared = new RealtimeClient(options).start();
  return shared;
}
