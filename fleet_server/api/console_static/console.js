// edgefleet operator console: vanilla JS, no build step, served by the server.
//
// Every read and every action goes through the admin API (/api/v1) with the operator's
// token in an Authorization header, so roles and audit are the API's own. The token is
// kept in sessionStorage (this tab only). Server data is written with textContent only.
"use strict";

(() => {
  // the server's root as the browser sees it (the page is {root}/console)
  const ROOT = location.pathname.replace(/\/console\/?$/, "");
  const API = `${ROOT}/api/v1`;
  const TOKEN_KEY = "edgefleet.console.token";
  const POLL_MS = 2000;
  const MAX_DEVICES = 5000; // devices fetched for the client-side filters
  const ACTION_LABELS = {
    start: "start",
    pause: "pause",
    resume: "resume",
    promote: "promote",
    abort: "abort",
    rollback: "roll back",
  };
  const CONFIRM = new Set(["abort", "rollback"]);

  const view = document.getElementById("view");
  const flashBox = document.getElementById("flash");
  let poller = null;
  let me = null;
  let rolloutSeq = 0; // the newest status request; older answers are dropped

  // -- helpers ----------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${token()}`, Accept: "application/json" };
    const init = { method, headers, credentials: "omit", cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(API + path, init);
    } catch (e) {
      throw new ApiError(0, "unreachable", `the server did not answer (${e.message})`);
    }
    let data = null;
    try {
      data = await resp.json();
    } catch (_e) {
      data = null;
    }
    if (!resp.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(resp.status, err.code || `http_${resp.status}`, err.message || resp.statusText);
    }
    return data;
  }

  async function allPages(path, cap) {
    const items = [];
    const sep = path.includes("?") ? "&" : "?";
    let offset = 0;
    while (offset !== null && items.length < cap) {
      const page = await api("GET", `${path}${sep}limit=500&offset=${offset}`);
      items.push(...page.items);
      offset = page.next_offset;
    }
    return items;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function fill(tbody, rows, emptyText, columns) {
    tbody.replaceChildren();
    if (!rows.length) {
      tbody.append(el("tr", {}, el("td", { colspan: columns, class: "empty" }, emptyText)));
      return;
    }
    for (const r of rows) tbody.append(r);
  }

  function flash(kind, text) {
    flashBox.hidden = !text;
    flashBox.className = kind;
    flashBox.textContent = text || "";
  }

  function when(ts) {
    if (ts === null || ts === undefined || ts === "") return "-";
    const d = typeof ts === "number" ? new Date(ts * 1000) : new Date(ts);
    if (Number.isNaN(d.getTime())) return String(ts);
    return `${d.toISOString().slice(0, 19).replace("T", " ")} UTC`;
  }

  function ago(ts) {
    if (!ts) return "never";
    const s = (Date.now() - new Date(ts).getTime()) / 1000;
    if (s < 120) return `${Math.max(0, Math.round(s))} s ago`;
    if (s < 7200) return `${(s / 60).toFixed(0)} min ago`;
    if (s < 172800) return `${(s / 3600).toFixed(1)} h ago`;
    return `${(s / 86400).toFixed(0)} d ago`;
  }

  function duration(s) {
    if (s === null || s === undefined) return "-";
    if (s < 120) return `${s.toFixed(0)} s`;
    if (s < 7200) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function num(x) {
    if (x === null || x === undefined) return "-";
    if (typeof x === "number" && !Number.isInteger(x)) return String(Number(x.toPrecision(4)));
    return String(x);
  }

  function bundle(b) {
    return b ? `${b.name} v${b.version} (${b.bundle_id})` : "-";
  }

  // engine texts count stages from 0; people see them from 1 (fleet_server/rollouts/numbering.py)
  function peopleStages(text) {
    return String(text || "")
      .replace(/stage (\d+) -> (\d+)/g, (_m, a, b) => `stage ${+a + 1} => ${+b + 1}`)
      .replace(/\bstage (\d+)\b(?! =>)/g, (_m, a) => `stage ${+a + 1}`)
      .replace(/ => /g, " -> ");
  }

  function badge(status) {
    return el("span", { class: `badge s-${status}` }, status.replace("_", " "));
  }

  function render(templateId) {
    const tpl = document.getElementById(templateId);
    view.replaceChildren(tpl.content.cloneNode(true));
  }

  function hashParams() {
    const [, query = ""] = location.hash.split("?");
    return new URLSearchParams(query);
  }

  function setHashParams(route, params) {
    const clean = new URLSearchParams();
    for (const [k, v] of params) if (v) clean.set(k, v);
    const q = clean.toString();
    history.replaceState(null, "", `#/${route}${q ? `?${q}` : ""}`);
  }

  // -- sign in ------------------------------------------------------------------------
  function showLogin(message) {
    stopPolling();
    me = null;
    document.getElementById("nav").hidden = true;
    document.getElementById("signout").hidden = true;
    document.getElementById("whoami").textContent = "";
    render("tpl-login");
    flash(message ? "error" : "", message || "");
    const form = document.getElementById("login-form");
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const value = form.elements.token.value.trim();
      sessionStorage.setItem(TOKEN_KEY, value);
      try {
        await whoami();
        flash("", "");
        if (!location.hash || location.hash === "#/login") location.hash = "#/rollouts";
        else route();
      } catch (e) {
        sessionStorage.removeItem(TOKEN_KEY);
        flash("error", `Sign-in refused: ${e.code}: ${e.message}`);
      }
    });
    document.getElementById("token").focus();
  }

  async function whoami() {
    me = await api("GET", "/whoami");
    document.getElementById("whoami").textContent = `${me.name} (${me.role})`;
    document.getElementById("nav").hidden = false;
    document.getElementById("signout").hidden = false;
    return me;
  }

  // the telemetry review (/dashboard) keeps its own HttpOnly cookie: hand it the token
  // in a same-origin form post, never in a URL
  document.getElementById("review-form").addEventListener("submit", (ev) => {
    const field = ev.target.elements.token;
    field.value = token() || "";
    setTimeout(() => {
      field.value = "";
    }, 0);
  });

  document.getElementById("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.hash = "#/login";
    showLogin("");
  });

  // -- routing ------------------------------------------------------------------------
  function stopPolling() {
    if (poller !== null) clearTimeout(poller);
    poller = null;
  }

  async function route() {
    stopPolling();
    if (!token()) return showLogin("");
    try {
      if (!me) await whoami();
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      return showLogin(`Sign in again: ${e.message}`);
    }
    const path = location.hash.replace(/^#\/?/, "").split("?")[0];
    const [section, id] = path.split("/");
    for (const a of document.querySelectorAll("#nav a[data-nav]")) {
      a.classList.toggle("current", a.dataset.nav === (section === "rollout" ? "rollouts" : section));
    }
    flash("", "");
    try {
      if (section === "rollout" && id) await rolloutPage(decodeURIComponent(id));
      else if (section === "devices") await devicesPage();
      else if (section === "groups") await groupsPage();
      else await rolloutsPage();
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        return showLogin(`Sign in again: ${e.message}`);
      }
      flash("error", e instanceof ApiError ? `${e.code}: ${e.message}` : String(e));
    }
  }

  window.addEventListener("hashchange", route);

  // -- rollouts -----------------------------------------------------------------------
  async function rolloutsPage() {
    render("tpl-rollouts");
    const form = document.getElementById("rollout-filters");
    const params = hashParams();
    form.elements.status.value = params.get("status") || "";
    const groups = new Map((await allPages("/groups", 5000)).map((g) => [g.id, g.name]));
    const load = async () => {
      const status = form.elements.status.value;
      setHashParams("rollouts", [["status", status]]);
      const q = status ? `?status=${encodeURIComponent(status)}` : "";
      const items = await allPages(`/rollouts${q}`, 1000);
      const rows = items.map((r) =>
        el(
          "tr",
          { dataset: { rollout: r.id } },
          el("td", {}, el("a", { href: `#/rollout/${encodeURIComponent(r.id)}` }, r.name)),
          el("td", {}, badge(r.status)),
          el("td", {}, r.stage_number > 0 ? `${r.stage_number} of ${r.stages_total}` : "-"),
          el("td", {}, r.strategy),
          el("td", {}, groups.get(r.group_id) || r.group_id),
          el("td", {}, when(r.updated_at)),
        ),
      );
      fill(form.parentNode.querySelector("tbody"), rows, "No rollouts.", 6);
      document.getElementById("rollouts-count").textContent =
        `${items.length} rollout(s); refreshes every ${(2 * POLL_MS) / 1000} s.`;
    };
    const again = () => {
      poller = setTimeout(() => {
        if (!document.getElementById("rollouts-table")) return;
        (document.hidden ? Promise.resolve() : load()).then(again, (e) => {
          if (e instanceof ApiError && e.status === 401) route();
          else {
            showError(e);
            again();
          }
        });
      }, 2 * POLL_MS);
    };
    form.addEventListener("change", () => load().catch(showError));
    await load();
    again();
  }

  function showError(e) {
    flash("error", e instanceof ApiError ? `${e.code}: ${e.message}` : String(e));
  }

  async function rolloutPage(id) {
    render("tpl-rollout");
    const hint = document.getElementById("r-actions-hint");
    if (me && me.role === "viewer") {
      hint.textContent =
        "You are signed in as a viewer: the server refuses rollout actions to viewers.";
    }
    for (const button of document.querySelectorAll("#r-actions button[data-action]")) {
      button.addEventListener("click", () => act(id, button.dataset.action, button));
    }
    await refreshRollout(id);
  }

  async function refreshRollout(id) {
    stopPolling();
    const mine = ++rolloutSeq;
    try {
      if (document.hidden && document.getElementById("r-status").dataset.status) {
        // a tab nobody looks at asks nothing of the server; it catches up when shown
        poller = setTimeout(() => refreshRollout(id).catch(() => route()), POLL_MS);
        return;
      }
      const s = await api("GET", `/rollouts/${encodeURIComponent(id)}/status`);
      if (mine !== rolloutSeq || !document.getElementById("r-status")) return;
      showStatus(s);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) throw e;
      if (mine !== rolloutSeq) return;
      showError(e);
    }
    if (mine === rolloutSeq && document.getElementById("r-status")) {
      poller = setTimeout(() => refreshRollout(id).catch(() => route()), POLL_MS);
    }
  }

  function showStatus(s) {
    const r = s.rollout || {};
    document.getElementById("r-name").textContent = r.name || s.rollout_id;
    const status = document.getElementById("r-status");
    status.textContent = s.status.replace("_", " ");
    status.className = `badge s-${s.status}`;
    status.dataset.status = s.status;
    const stage =
      s.stage_number > 0
        ? `stage ${s.stage_number} of ${s.stages_total}`
        : `not started (${s.stages_total} stages)`;
    document.getElementById("r-sub").textContent =
      `${s.rollout_id} · ${stage} · strategy ${r.strategy || "-"}`;

    const allowed = new Set(s.actions || []);
    for (const b of document.querySelectorAll("#r-actions button[data-action]")) {
      b.hidden = !allowed.has(b.dataset.action);
    }
    document.getElementById("r-actions").hidden = allowed.size === 0;
    document.getElementById("r-no-actions").hidden = allowed.size !== 0;
    document.getElementById("r-no-actions").textContent =
      `No operator action applies to a ${s.status.replace("_", " ")} rollout.`;

    const facts = document.getElementById("r-facts");
    const group = s.group || {};
    const pairs = [
      ["Candidate", bundle(s.candidate)],
      ["Previous", bundle(s.previous)],
      ["Rolled back to", s.rollback_bundle ? bundle(s.rollback_bundle) : null],
      [
        "Group",
        `${group.name || group.id} (${s.devices.total} devices; canary ${r.canary_devices ?? "-"}, control ${r.control_devices ?? "-"})`,
      ],
      ["Holding", peopleStages(s.holding)],
      ["Paused by", s.paused_by ? peopleStages(s.paused_by) : null],
      ["Created", `${when(r.created_at)} by ${r.created_by || "-"}`],
    ];
    facts.replaceChildren();
    for (const [k, v] of pairs) {
      if (v === null) continue;
      facts.append(el("dt", {}, k), el("dd", { dataset: { fact: k.toLowerCase() } }, v));
    }

    const stages = document.getElementById("r-stages");
    stages.replaceChildren(
      ...(s.stages || []).map((st) =>
        el(
          "li",
          { class: st.number === s.stage_number ? "current" : st.number < s.stage_number ? "done" : "" },
          `${st.percent}% · at least ${st.min_devices} device(s) · soak ${duration(st.soak_seconds)}`,
        ),
      ),
    );

    const ev = s.evaluation || {};
    const soak = document.getElementById("r-soak");
    soak.replaceChildren();
    if ((s.status === "running" || s.status === "paused") && s.stage_number > 0) {
      const st = s.stages[s.stage_number - 1];
      const elapsed = ev.soak_elapsed || 0;
      const pct = st.soak_seconds ? Math.min(100, (100 * elapsed) / st.soak_seconds) : 100;
      soak.append(
        el("p", {}, `Soak: ${duration(elapsed)} of ${duration(st.soak_seconds)} (${pct.toFixed(0)}%), stage started ${when(s.stage_started_at)}`),
        el("progress", { max: 100, value: pct.toFixed(0) }),
        el("p", {}, `Canaries: ${ev.canary_devices || 0} reporting, ${st.min_devices} needed to advance`),
      );
    }

    let gates = ev.gates || [];
    const note = document.getElementById("r-gates-note");
    note.textContent = "";
    if (!gates.length && s.last_decision) {
      gates = s.last_decision.gates || [];
      note.textContent = `as of the engine's ${s.last_decision.action} at ${when(s.last_decision.at)} (stage ${s.last_decision.stage_number})`;
    }
    fill(
      document.querySelector("#r-gates tbody"),
      gates.map((g) =>
        el(
          "tr",
          { dataset: { gate: g.kind } },
          el("td", {}, g.name || g.kind),
          el("td", { class: `v-${g.verdict}` }, String(g.verdict).toUpperCase()),
          el("td", {}, num(g.canary_value)),
          el("td", {}, num(g.threshold)),
          el("td", {}, `${g.canary_samples || 0} of ${g.min_samples || 0}`),
          el(
            "td",
            {},
            g.control_source && !["none", "reference"].includes(g.control_source)
              ? `${num(g.control_value)} (${g.control_samples || 0})`
              : g.control_source || "-",
          ),
        ),
      ),
      "No gate figures yet.",
      6,
    );

    const counts = (id, obj) =>
      fill(
        document.querySelector(`#${id} tbody`),
        Object.entries(obj || {}).map(([k, v]) =>
          el("tr", { dataset: { key: k } }, el("th", {}, k), el("td", {}, String(v))),
        ),
        "none",
        2,
      );
    counts("r-states", s.devices.by_state);
    counts("r-versions", s.devices.by_version);

    fill(
      document.querySelector("#r-refusals tbody"),
      (s.refusals || []).map((f) =>
        el(
          "tr",
          {},
          el("td", {}, f.code),
          el("td", {}, f.outcome),
          el("td", {}, `${f.count}: ${f.devices.join(", ")}${f.count > f.devices.length ? ` and ${f.count - f.devices.length} more` : ""}`),
          el("td", {}, f.message || ""),
        ),
      ),
      "No device refused or failed the candidate.",
      4,
    );

    const history = ((r.state || {}).history || []).slice().reverse();
    fill(
      document.querySelector("#r-history tbody"),
      history.map((h) =>
        el(
          "tr",
          {},
          el("td", {}, when(h.ts)),
          el("td", {}, h.actor),
          el("td", {}, h.action),
          el("td", {}, `${h.from_status} -> ${h.to_status}`),
          el("td", {}, String((h.stage ?? -1) + 1)),
          el("td", {}, peopleStages(h.reason)),
        ),
      ),
      "No transitions yet.",
      6,
    );
    document.getElementById("r-updated").textContent =
      `Updated ${when(s.now)}; refreshes every ${POLL_MS / 1000} s.`;
  }

  async function act(id, action, button) {
    const reasonBox = document.getElementById("r-reason");
    const reason = reasonBox.value.trim();
    const label = ACTION_LABELS[action];
    if (CONFIRM.has(action) && !window.confirm(`${label} rollout ${id}? Devices will be told at once.`)) {
      return;
    }
    const buttons = document.querySelectorAll("#r-actions button");
    for (const b of buttons) b.disabled = true;
    flash("info", `Sending ${label}…`);
    try {
      const r = await api("POST", `/rollouts/${encodeURIComponent(id)}/${action}`, {
        reason: reason || `from the console: ${label}`,
      });
      reasonBox.value = "";
      flash("ok", `${label}: done; the rollout is ${r.status.replace("_", " ")}.`);
      await refreshRollout(id);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return showLogin(`Sign in again: ${e.message}`);
      flash(
        "error",
        `The server refused to ${label} the rollout: ${e.code}: ${e.message}`,
      );
    } finally {
      for (const b of buttons) b.disabled = false;
      button.blur();
    }
  }

  // -- devices ------------------------------------------------------------------------
  function deviceState(d) {
    return d.revoked ? "revoked" : d.health;
  }

  function deviceVersion(d) {
    return d.current_name ? `${d.current_name} v${d.current_version}` : "none";
  }

  function options(select, values, chosen) {
    for (const v of values) select.append(el("option", { value: v }, v));
    select.value = values.includes(chosen) ? chosen : "";
  }

  async function devicesPage() {
    render("tpl-devices");
    const form = document.getElementById("device-filters");
    const params = hashParams();
    const groups = await allPages("/groups", 5000);
    options(
      form.elements.group,
      groups.map((g) => g.name),
      params.get("group") || "",
    );
    let loadedGroup = null;
    let devices = [];
    let seq = 0; // the newest load; an older one that answers late is dropped
    const load = async () => {
      const mine = ++seq;
      const group = form.elements.group.value;
      if (group !== loadedGroup) {
        const g = groups.find((x) => x.name === group);
        const list = await allPages(
          g ? `/groups/${encodeURIComponent(g.id)}/devices` : "/devices",
          MAX_DEVICES,
        );
        if (mine !== seq) return;
        devices = list;
        loadedGroup = group;
        const state = form.elements.state.value || params.get("state") || "";
        const version = form.elements.version.value || params.get("version") || "";
        for (const [name, values, chosen] of [
          ["state", devices.map(deviceState), state],
          ["version", devices.map(deviceVersion), version],
        ]) {
          const select = form.elements[name];
          select.replaceChildren(el("option", { value: "" }, "any"));
          options(select, [...new Set(values)].sort(), chosen);
        }
      }
      show();
    };
    const show = () => {
      if (form.elements.group.value !== loadedGroup) {
        document.getElementById("devices-count").textContent = "loading…";
        return;
      }
      const state = form.elements.state.value;
      const version = form.elements.version.value;
      const q = form.elements.q.value.trim().toLowerCase();
      setHashParams("devices", [
        ["state", state],
        ["version", version],
        ["group", form.elements.group.value],
        ["q", q],
      ]);
      const shown = devices.filter(
        (d) =>
          (!state || deviceState(d) === state) &&
          (!version || deviceVersion(d) === version) &&
          (!q ||
            [
              d.id,
              d.device_class,
              deviceVersion(d),
              d.health_code || "",
              ...Object.entries(d.labels || {}).map(([k, v]) => `${k}=${v}`),
            ]
              .join(" ")
              .toLowerCase()
              .includes(q)),
      );
      const rows = shown.map((d) => {
        const desired = (d.assignment || {}).desired;
        return el(
          "tr",
          { dataset: { device: d.id } },
          el("td", {}, d.id),
          el("td", {}, d.device_class),
          el("td", {}, deviceVersion(d)),
          el("td", {}, d.shadow_name ? `${d.shadow_name} v${d.shadow_version}` : "-"),
          el("td", {}, desired ? `${desired.name} v${desired.version}` : "-"),
          el(
            "td",
            { class: `h-${deviceState(d)}` },
            deviceState(d) + (d.health_code ? ` (${d.health_code})` : ""),
          ),
          el("td", { title: when(d.last_seen_at) }, ago(d.last_seen_at)),
          el(
            "td",
            {},
            Object.entries(d.labels || {})
              .map(([k, v]) => `${k}=${v}`)
              .join(", "),
          ),
        );
      });
      fill(document.querySelector("#devices-table tbody"), rows, "No device matches.", 8);
      document.getElementById("devices-count").textContent =
        `${shown.length} of ${devices.length} device(s)` +
        (devices.length >= MAX_DEVICES ? ` (the first ${MAX_DEVICES}; use the CLI for more)` : "");
    };
    form.elements.q.value = params.get("q") || "";
    form.addEventListener("change", () => load().catch(showError));
    form.elements.q.addEventListener("input", show);
    form.addEventListener("submit", (ev) => ev.preventDefault());
    await load();
  }

  // -- groups -------------------------------------------------------------------------
  async function groupsPage() {
    render("tpl-groups");
    const form = document.getElementById("group-filters");
    const params = hashParams();
    const groups = await allPages("/groups", 5000);
    const rollouts = await allPages("/rollouts", 1000);
    const detail = await Promise.all(
      groups.map((g) => api("GET", `/groups/${encodeURIComponent(g.id)}`)),
    );
    const show = () => {
      const q = form.elements.q.value.trim().toLowerCase();
      setHashParams("groups", [["q", q]]);
      const shown = detail.filter(
        (g) =>
          !q ||
          [g.name, g.device_class || "", g.description, ...Object.entries(g.selector).map(([k, v]) => `${k}=${v}`)]
            .join(" ")
            .toLowerCase()
            .includes(q),
      );
      const rows = shown.map((g) => {
        const mine = rollouts.filter((r) => r.group_id === g.id);
        const active = mine.filter((r) => ["pending", "running", "paused"].includes(r.status));
        return el(
          "tr",
          { dataset: { group: g.name } },
          el("td", {}, el("a", { href: `#/devices?group=${encodeURIComponent(g.name)}` }, g.name)),
          el(
            "td",
            {},
            Object.entries(g.selector)
              .map(([k, v]) => `${k}=${v}`)
              .join(", ") || "(all)",
          ),
          el("td", {}, g.device_class || "any"),
          el("td", {}, String(g.device_count ?? "-")),
          el("td", {}, g.description || ""),
          el(
            "td",
            {},
            active.length
              ? active.map((r) =>
                  el("a", { href: `#/rollout/${encodeURIComponent(r.id)}`, class: "pill" }, `${r.name} (${r.status})`),
                )
              : `${mine.length} total, none active`,
          ),
        );
      });
      fill(document.querySelector("#groups-table tbody"), rows, "No group matches.", 6);
      document.getElementById("groups-count").textContent = `${shown.length} of ${detail.length} group(s)`;
    };
    form.elements.q.value = params.get("q") || "";
    form.addEventListener("input", show);
    form.addEventListener("submit", (ev) => ev.preventDefault());
    show();
  }

  route();
})();
