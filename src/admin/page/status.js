"use strict";
// The status page: every two seconds, /api/pools drawn as one table per
// pool. Text goes in with textContent only: names come from the
// configuration and reasons from backends.
const REFRESH_MS = 2000;
let previous = new Map();
let previousAt = 0;

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function heading(row, names) {
  for (const name of names) {
    const th = document.createElement("th");
    th.textContent = name;
    row.appendChild(th);
  }
}

function render(view, now) {
  const seconds = (now - previousAt) / 1000;
  const next = new Map();
  const sections = [];
  for (const pool of view.pools) {
    const section = document.createElement("section");
    section.dataset.pool = pool.name;
    const title = document.createElement("h2");
    title.textContent = pool.name;
    const about = document.createElement("small");
    about.textContent = "balance " + pool.balance + " \u00b7 ";
    const queued = document.createElement("span");
    queued.textContent = "queued " + pool.queued;
    if (pool.queued > 0) queued.className = "queued";
    about.appendChild(queued);
    title.appendChild(about);
    section.appendChild(title);
    const table = document.createElement("table");
    heading(table.createTHead().insertRow(), ["backend", "address", "weight", "state",
      "health", "why", "role", "open", "new/s", "total"]);
    const body = table.createTBody();
    for (const b of pool.backends) {
      const key = pool.name + "\u0000" + b.name;
      next.set(key, b.total);
      const before = previous.get(key);
      const rate = before === undefined || seconds <= 0 ? "" :
        (Math.max(0, b.total - before) / seconds).toFixed(1);
      const row = body.insertRow();
      row.className = "health-" + b.health;
      row.dataset.backend = b.name;
      row.dataset.health = b.health;
      row.dataset.state = b.state;
      cell(row, b.name);
      cell(row, b.address);
      cell(row, b.backup ? b.weight + " (backup)" : String(b.weight), "number");
      cell(row, b.state, "state-" + b.state);
      cell(row, b.health, "health");
      cell(row, b.reason || "", "reason");
      cell(row, b.role || "");
      cell(row, String(b.active), "number");
      cell(row, rate, "number");
      cell(row, String(b.total), "number");
    }
    section.appendChild(table);
    sections.push(section);
  }
  document.getElementById("pools").replaceChildren(...sections);
  previous = next;
  previousAt = now;
}

async function refresh() {
  const problem = document.getElementById("problem");
  try {
    const response = await fetch("/api/pools", { cache: "no-store" });
    if (!response.ok) throw new Error("/api/pools answered " + response.status);
    render(await response.json(), performance.now());
    problem.hidden = true;
    document.getElementById("updated").textContent =
      "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    problem.textContent = "cannot read sluice's state: " + e.message;
    problem.hidden = false;
  }
}

document.getElementById("where").textContent = location.host;
refresh();
setInterval(refresh, REFRESH_MS);
