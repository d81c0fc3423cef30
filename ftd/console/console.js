// The ftvm web console: the pair's nodes, VMs, alerts and audit log over
// the node manager's REST API (a session cookie from POST /api/session),
// kept live by the event stream and a poll, with live charts of a VM's
// checkpointing (uPlot, installed with the console).

const REFRESH_MS = 2000;
const CHART_POINTS = 300;
const MAX_EVENTS = 2000;

const state = {
  session: null,
  nodes: [],
  vms: [],
  alerts: [],
  events: [],
  audit: [],
  tracking: [],
  stats: null,
  refreshing: false,
  stream: null,
};

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key.startsWith('data-')) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function utc(ms) {
  return new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, '');
}

function list(names) {
  return names && names.length ? names.join(', ') : '-';
}

// --- the API -------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const options = {
    method,
    credentials: 'same-origin',
    headers: { 'X-Ftd-Console': '1' },
  };
  if (body !== undefined) {
    options.headers['Content-Type'] = 'application/json';
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new ApiError(0, `the node does not answer (${e.message})`);
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = data && data.message ? data.message : `${response.status} ${response.statusText}`;
    if (response.status === 401 && path !== '/api/session') showLogin('Your session ended: log in again.');
    throw new ApiError(response.status, message);
  }
  return data;
}

// --- login ---------------------------------------------------------------

function showLogin(message) {
  state.session = null;
  stopStream();
  stopStats();
  for (const id of ['dashboard', 'vm-page', 'events-page', 'audit-page', 'activity-panel']) $(`#${id}`).hidden = true;
  $('#nav').hidden = true;
  $('#logout').hidden = true;
  $('#login').hidden = false;
  $('#login-error').textContent = message || '';
  $('#login-user').focus();
}

async function logIn(event) {
  event.preventDefault();
  $('#login-error').textContent = '';
  const token = $('#login-token').value;
  const login = token
    ? { token }
    : { user: $('#login-user').value.trim(), password: $('#login-password').value };
  if (!token && (!login.user || !login.password)) {
    $('#login-error').textContent = 'Give a user and a password, or the API token.';
    return;
  }
  try {
    state.session = await api('POST', '/api/session', login);
    for (const id of ['login-token', 'login-password']) $(`#${id}`).value = '';
    started();
  } catch (e) {
    $('#login-error').textContent = e.message;
  }
}

async function logOut() {
  try {
    await api('DELETE', '/api/session');
  } catch {
    // Gone already: the login page either way.
  }
  showLogin('Logged out.');
}

function started() {
  $('#login').hidden = true;
  $('#nav').hidden = false;
  $('#logout').hidden = false;
  $('#activity-panel').hidden = false;
  $('#serving').textContent = `${state.session.user}${state.session.role ? ` (${state.session.role})` : ''} on ${state.session.node}`;
  startStream();
  route();
  refresh();
}

// --- live state ----------------------------------------------------------

function startStream() {
  stopStream();
  const stream = new EventSource('/api/events/stream');
  const take = (message) => {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    state.events.push(event);
    if (state.events.length > MAX_EVENTS) state.events.splice(0, state.events.length - MAX_EVENTS);
    if (event.alert) state.alerts.push(event);
    if (state.alerts.length > MAX_EVENTS) state.alerts.splice(0, state.alerts.length - MAX_EVENTS);
    setLive(true);
    renderEvents();
    renderAlerts();
    refresh();
  };
  stream.addEventListener('event', take);
  stream.addEventListener('alert', take);
  stream.addEventListener('lagged', () => loadEvents());
  stream.onopen = () => {
    setLive(true);
    loadEvents();
  };
  stream.onerror = () => setLive(false);
  state.stream = stream;
}

function stopStream() {
  if (state.stream) state.stream.close();
  state.stream = null;
}

function setLive(up) {
  const live = $('#live');
  live.textContent = up ? 'live' : 'reconnecting';
  live.className = up ? 'live up' : 'live down';
}

async function loadEvents() {
  try {
    const events = await api('GET', '/api/events?limit=1000');
    state.events = events;
    state.alerts = events.filter((e) => e.alert);
    renderEvents();
    renderAlerts();
  } catch {
    // The stream or the next poll brings them.
  }
}

async function refresh() {
  if (!state.session || state.refreshing) return;
  state.refreshing = true;
  try {
    const [nodes, vms] = await Promise.all([api('GET', '/api/nodes'), api('GET', '/api/vms')]);
    state.nodes = nodes;
    state.vms = vms;
    renderNodes();
    renderVms();
    renderVmFacts();
    followTracked();
    if (currentRoute().page === 'audit') await loadAudit();
  } catch (e) {
    if (e.status !== 401) setLive(false);
  } finally {
    state.refreshing = false;
  }
}

// --- the dashboard -------------------------------------------------------

// Updates a table's rows in place: a row per item (by its key), each cell
// rebuilt only when what it shows changed, so that a button under the
// pointer is not replaced by the periodic refresh in the middle of a click.
function syncRows(tbody, keyAttr, items, rowOf) {
  const existing = new Map([...tbody.children].map((tr) => [tr.getAttribute(keyAttr), tr]));
  const rows = items.map((item) => {
    const { key, cells } = rowOf(item);
    const tr = existing.get(key) || el('tr', { [keyAttr]: key });
    cells.forEach((cell, i) => {
      let td = tr.children[i];
      if (!td) {
        td = el('td');
        tr.append(td);
      }
      if (td.className !== cell.class) td.className = cell.class;
      const sig = JSON.stringify(cell.show);
      if (td.dataset.sig !== sig) {
        td.dataset.sig = sig;
        td.replaceChildren(...[cell.build ? cell.build(cell.show) : String(cell.show)].flat());
      }
    });
    return tr;
  });
  rows.forEach((tr, i) => {
    if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
  });
  while (tbody.children.length > rows.length) tbody.lastElementChild.remove();
}

function buttons(list) {
  return list.map(([label, action, target]) => button(label, action, target));
}

function renderNodes() {
  syncRows($('#nodes tbody'), 'data-node', state.nodes, (n) => {
    const actions = [];
    if (n.maintenance === 'off' || n.maintenance === 'leaving') {
      actions.push(['Enter maintenance', 'enter-maintenance', { node: n.name }]);
    }
    if (n.maintenance === 'on' || n.maintenance === 'entering') {
      actions.push(['Leave maintenance', 'exit-maintenance', { node: n.name }]);
    }
    return {
      key: n.name,
      cells: [
        { class: 'name', show: [n.name, n.local], build: ([name, local]) => [name, local ? el('span', { class: 'muted' }, ' (this node)') : ''] },
        { class: `state state-${n.state}`, show: n.state },
        {
          class: `maintenance maintenance-${n.maintenance}`,
          show: [n.maintenance, n.maintenance_waiting || []],
          build: ([m, waiting]) => [m, ...waiting.map((line) => el('div', { class: 'muted' }, line))],
        },
        { class: 'alink', show: list(n.alink) },
        { class: 'primaries', show: list(n.primaries) },
        { class: 'standbys', show: list(n.standbys) },
        { class: 'actions', show: actions, build: buttons },
      ],
    };
  });
}

// Why the VM's primary runs where it does (VMs spread by their preferred
// node; maintenance and faults move them).
function placement(vm) {
  if (vm.migrating) return `migrating to ${vm.standby_node || 'its standby'}: its memory is being copied`;
  const preferred = vm.definition && vm.definition.preferred_node;
  if (!vm.primary_node || !preferred) return '-';
  if (vm.primary_node === preferred) return 'its preferred node';
  const node = state.nodes.find((n) => n.name === preferred);
  if (node && (node.maintenance === 'entering' || node.maintenance === 'on')) return `${preferred} (preferred) is in maintenance`;
  if (node && node.maintenance === 'leaving') return `returns to ${preferred} once protected`;
  if (node && node.state !== 'up') return `${preferred} (preferred) is ${node.state}`;
  return `prefers ${preferred}; moved by a failover or switchover`;
}

function standbyState(vm) {
  const role = (vm.roles || []).find((r) => r.role === 'standby');
  return role ? `${role.node} (${role.state})` : '-';
}

function renderVms() {
  syncRows($('#vms tbody'), 'data-vm', state.vms, (vm) => {
    const actions = [];
    if (vm.desired === 'stopped') actions.push(['Start', 'start', { vm: vm.name }]);
    if (vm.desired === 'running') actions.push(['Stop', 'stop', { vm: vm.name }]);
    if (vm.level !== 'ft') actions.push(['Protect (FT)', 'protect', { vm: vm.name }]);
    if (vm.level !== 'ha') actions.push(['Protect (HA)', 'protect_ha', { vm: vm.name }]);
    if (vm.level !== 'unprotected') actions.push(['Unprotect', 'unprotect', { vm: vm.name }]);
    if (vm.state === 'protected' && vm.level === 'ft') actions.push(['Switch over', 'switchover', { vm: vm.name }]);
    if (vm.state === 'protected' && vm.level === 'ha') actions.push(['Migrate', 'migrate', { vm: vm.name }]);
    return {
      key: vm.name,
      cells: [
        { class: 'name', show: vm.name, build: (name) => el('a', { href: `#/vm/${encodeURIComponent(name)}` }, name) },
        { class: `state state-${vm.state}`, show: vm.state },
        { class: 'level', show: vm.level },
        { class: 'primary', show: vm.primary_node || '-' },
        { class: 'placement muted', show: placement(vm) },
        { class: 'standby', show: standbyState(vm) },
        { class: 'generation', show: vm.generation },
        { class: 'epoch', show: vm.epoch ?? '-' },
        { class: 'actions', show: actions, build: buttons },
      ],
    };
  });
}

function renderAlerts() {
  // The newest 20 by when they were raised: the peer's come a moment later
  // than this node's, or, after the two nodes lost each other, much later.
  const alerts = [...state.alerts].sort((a, b) => a.unix_ms - b.unix_ms || a.id - b.id).slice(-20).reverse();
  const items = alerts.map((a) =>
    el(
      'li',
      { class: `severity-${a.severity}`, 'data-event': String(a.id) },
      el('span', { class: 'time' }, utc(a.unix_ms)),
      ' ',
      el('span', { class: 'node' }, a.node),
      ' ',
      a.message,
    ),
  );
  $('#alerts').replaceChildren(...(items.length ? items : [el('li', { class: 'muted' }, 'No alerts.')]));
}

function button(label, action, target) {
  const attrs = { type: 'button', 'data-action': action };
  if (target.node) attrs['data-node'] = target.node;
  if (target.vm) attrs['data-vm'] = target.vm;
  return el('button', attrs, label);
}

// --- actions -------------------------------------------------------------

function peerOf(node) {
  const other = state.nodes.find((n) => n.name !== node);
  return other ? other.name : 'the peer';
}

const ACTIONS = {
  'enter-maintenance': (t) => ({
    question: `Enter maintenance on ${t.node}? Its VMs (${list(state.nodes.find((n) => n.name === t.node)?.primaries)}) switch over to ${peerOf(t.node)} and run there unprotected; ${t.node} keeps no standby.`,
    request: () => api('POST', `/api/nodes/${encodeURIComponent(t.node)}/maintenance/enter`),
    track: { node: t.node, target: 'on', done: `${t.node} is in maintenance: no VM runs there` },
  }),
  'exit-maintenance': (t) => ({
    question: `Leave maintenance on ${t.node}? Its standbys start, and the VMs that prefer it return once protected.`,
    request: () => api('POST', `/api/nodes/${encodeURIComponent(t.node)}/maintenance/exit`),
    track: { node: t.node, target: 'off', done: `${t.node} is back in service` },
  }),
  start: (t) => ({
    question: `Start ${t.vm}?`,
    request: () => api('POST', `/api/vms/${encodeURIComponent(t.vm)}/start`),
  }),
  stop: (t) => ({
    question: `Stop ${t.vm} on both nodes? Its guest is shut down.`,
    request: () => api('POST', `/api/vms/${encodeURIComponent(t.vm)}/stop`),
  }),
  protect: (t) => ({
    question: `Protect ${t.vm} at level FT? A standby on the peer is synchronised.`,
    request: () => api('POST', `/api/vms/${encodeURIComponent(t.vm)}/protect`),
  }),
  protect_ha: (t) => ({
    question: `Protect ${t.vm} at level HA? Its disks are mirrored to the peer, which reboots it there if this node is lost (a running VM changes level without a reboot).`,
    request: () => api('POST', `/api/vms/${encodeURIComponent(t.vm)}/protect?level=ha`),
  }),
  unprotect: (t) => ({
    question: `Run ${t.vm} unprotected? Its standby stops: losing its node then stops the VM.`,
    request: () => api('POST', `/api/vms/${encodeURIComponent(t.vm)}/unprotect`),
  }),
  switchover: (t) => ({
    question: `Switch ${t.vm} over to its standby? Nothing is lost; its clients pause briefly.`,
    request: () => switchover(t.vm),
  }),
  migrate: (t) => ({
    question: `Move ${t.vm} to its standby by live migration? Its memory is copied while it runs (protected at FT meanwhile), then it switches over and goes back to HA.`,
    request: () => switchover(t.vm),
    // The answer comes once the copy began (its view names the node the
    // VM moves from): the move shows in the VM's row.
    track: { vm: t.vm, underway: 'its memory is being copied' },
  }),
};

// A switchover may be asked of either node: the one without the primary
// passes it to the one with it.
function switchover(vm) {
  // `from`: a VM that moved meanwhile is refused, not moved back.
  const view = state.vms.find((v) => v.name === vm);
  const from = view && view.primary_node ? `?from=${encodeURIComponent(view.primary_node)}` : '';
  return api('POST', `/api/vms/${encodeURIComponent(vm)}/switchover${from}`);
}

let confirmed = null;

function ask(question) {
  const dialog = $('#confirm');
  $('#confirm-text').textContent = question;
  return new Promise((resolve) => {
    confirmed = resolve;
    dialog.returnValue = '';
    dialog.showModal();
  });
}

async function act(action, target) {
  const make = ACTIONS[action];
  if (!make) return;
  const { question, request, track } = make(target);
  if (!(await ask(question))) return;
  const entry = activity(`${question.split('?')[0]}: asked`);
  try {
    const answer = await request();
    if (track) {
      entry.update(`${question.split('?')[0]}: under way (${track.underway || answer.maintenance})`, 'running');
      const lastAlert = Math.max(0, ...state.alerts.map((a) => a.id));
      state.tracking.push({ ...track, from: answer && answer.primary_node, lastAlert, entry, started: Date.now(), said: new Set() });
    } else {
      entry.update(`${question.split('?')[0]}: done${answer && answer.state ? ` (${answer.name} ${answer.state}, primary ${answer.primary_node || '-'})` : ''}`, 'done');
    }
  } catch (e) {
    // 502/504: asked of the other node, which failed or gave no answer.
    const how = e.status === 504 ? 'outcome unknown' : e.status === 502 ? 'failed' : 'refused';
    entry.update(`${question.split('?')[0]}: ${how}: ${e.message}`, 'failed');
  }
  refresh();
}

// A VM move asked (a live migration): done once the VM runs protected on
// another node; given up on after a while (the events say why).
const MOVE_SEEN_WITHIN_MS = 10 * 60 * 1000;

function followMove(t) {
  const vm = state.vms.find((v) => v.name === t.vm);
  const secs = ((Date.now() - t.started) / 1000).toFixed(1);
  if (vm && vm.primary_node && vm.primary_node !== t.from) {
    t.entry.update(`${t.vm} moved to ${vm.primary_node} (${secs} s)`, 'done');
    return false;
  }
  // Called off: the VM runs on where it was (its alert says why).
  const calledOff = state.alerts.find((a) => a.id > t.lastAlert && a.vm === t.vm
    && (a.message.includes('live migration called off') || a.message.includes('switchover not done')));
  if (calledOff) {
    t.entry.update(`${t.vm}: not moved: ${calledOff.message}`, 'failed');
    return false;
  }
  if (Date.now() - t.started > MOVE_SEEN_WITHIN_MS) {
    t.entry.update(`${t.vm}: no move seen in ${secs} s; see its events`, 'failed');
    return false;
  }
  return true;
}

function followTracked() {
  state.tracking = state.tracking.filter((t) => {
    if (t.vm) return followMove(t);
    const node = state.nodes.find((n) => n.name === t.node);
    if (!node) return true;
    for (const line of node.maintenance_waiting || []) {
      if (!t.said.has(line)) {
        t.said.add(line);
        t.entry.add(line);
      }
    }
    if (node.maintenance === t.target) {
      const secs = ((Date.now() - t.started) / 1000).toFixed(1);
      t.entry.update(`${t.done} (${secs} s)`, 'done');
      return false;
    }
    // Called off meanwhile (the opposite step was asked, here or elsewhere).
    const opposite = t.target === 'on' ? ['off', 'leaving'] : ['entering', 'on'];
    if (opposite.includes(node.maintenance)) {
      t.entry.update(`${t.node}: called off (maintenance is ${node.maintenance} now)`, 'failed');
      return false;
    }
    return true;
  });
}

let activities = 0;

function activity(text) {
  activities += 1;
  const title = el('span', { class: 'text' }, text);
  const steps = el('ul', { class: 'steps' });
  const item = el('li', { class: 'running', 'data-activity': String(activities) }, el('span', { class: 'time' }, utc(Date.now())), ' ', title, steps);
  $('#activity').prepend(item);
  return {
    update(newText, status) {
      title.textContent = newText;
      item.className = status;
    },
    add(line) {
      steps.append(el('li', {}, line));
    },
  };
}

// --- the VM page and its charts -------------------------------------------

const CHARTS = [
  { id: 'rate', title: 'Checkpoints per second', series: [{ label: 'checkpoints/s', stroke: '#2b6cb0' }] },
  { id: 'stop', title: 'Guest stop time (ms)', series: [{ label: 'p50', stroke: '#2f855a' }, { label: 'p99', stroke: '#c05621' }] },
  { id: 'dirty', title: 'Dirty pages per checkpoint', series: [{ label: 'pages', stroke: '#6b46c1' }] },
  { id: 'alink', title: 'A-link throughput (MB/s)', series: [{ label: 'MB/s', stroke: '#2c7a7b' }] },
  { id: 'ack', title: 'Acknowledgement latency (ms)', series: [{ label: 'p50', stroke: '#2f855a' }, { label: 'p99', stroke: '#c05621' }] },
  { id: 'held', title: 'Held output (frames)', series: [{ label: 'held', stroke: '#b7791f' }] },
];

function startStats(vm) {
  stopStats();
  const stats = {
    vm,
    last: null,
    data: Object.fromEntries(CHARTS.map((c) => [c.id, [[], ...c.series.map(() => [])]])),
    plots: {},
    source: new EventSource(`/api/vms/${encodeURIComponent(vm)}/stats`),
  };
  const box = $('#vm-charts');
  box.replaceChildren();
  const note = $('#vm-charts-note');
  if (typeof window.uPlot !== 'function') {
    note.hidden = false;
    note.textContent = 'Charts are not available: the console\'s charting library is not installed on this node (images/console-vendor.sh INSTALL_DIR).';
  } else {
    note.hidden = true;
    for (const chart of CHARTS) {
      const holder = el('figure', { class: 'chart', 'data-chart': chart.id }, el('figcaption', {}, chart.title));
      box.append(holder);
      stats.plots[chart.id] = new window.uPlot(
        {
          width: 420,
          height: 180,
          series: [{}, ...chart.series.map((s) => ({ label: s.label, stroke: s.stroke, width: 1.5 }))],
          axes: [{}, { size: 60 }],
          legend: { live: false },
        },
        stats.data[chart.id],
        holder,
      );
    }
  }
  stats.source.addEventListener('sample', (message) => {
    try {
      takeSample(stats, JSON.parse(message.data));
    } catch (e) {
      console.warn('a stats sample could not be read', e);
    }
  });
  stats.source.addEventListener('gone', () => stopStats());
  state.stats = stats;
}

function stopStats() {
  if (state.stats) state.stats.source.close();
  state.stats = null;
}

function takeSample(stats, sample) {
  const last = stats.last;
  stats.last = sample;
  renderSync(sample);
  if (!last || last.node !== sample.node || sample.checkpoints < last.checkpoints) return;
  const secs = (sample.unix_ms - last.unix_ms) / 1000;
  if (secs <= 0) return;
  const checkpoints = sample.checkpoints - last.checkpoints;
  const t = sample.unix_ms / 1000;
  const values = {
    rate: [checkpoints / secs],
    stop: [sample.stop_us_p50 / 1000, sample.stop_us_p99 / 1000],
    dirty: [checkpoints > 0 ? (sample.dirty_pages_total - last.dirty_pages_total) / checkpoints : 0],
    alink: [(sample.alink_bytes_sent - last.alink_bytes_sent) / secs / 1e6],
    ack: [sample.ack_us_p50 / 1000, sample.ack_us_p99 / 1000],
    held: [sample.output_frames_held_now],
  };
  for (const chart of CHARTS) {
    const data = stats.data[chart.id];
    data[0].push(t);
    values[chart.id].forEach((v, i) => data[i + 1].push(v));
    if (data[0].length > CHART_POINTS) data.forEach((column) => column.shift());
    const plot = stats.plots[chart.id];
    if (plot) plot.setData(data);
  }
}

function renderSync(sample) {
  const box = $('#vm-sync');
  if (!sample.sync || !sample.sync.total_bytes) {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  const done = sample.sync.done_bytes / sample.sync.total_bytes;
  $('#vm-sync-bar').value = done;
  const rate = sample.sync.rate_bytes_per_s ? `, ${(sample.sync.rate_bytes_per_s / 1e6).toFixed(1)} MB/s` : '';
  const left = sample.sync.eta_s !== undefined ? `, about ${sample.sync.eta_s} s left` : '';
  $('#vm-sync-text').textContent = `Synchronising the standby (${sample.sync.phase}): ${(100 * done).toFixed(0)}% of ${(sample.sync.total_bytes / 1e6).toFixed(0)} MB${rate}${left}`;
}

function renderVmFacts() {
  const page = currentRoute();
  if (page.page !== 'vm') return;
  const vm = state.vms.find((v) => v.name === page.vm);
  $('#vm-title').textContent = vm ? `${vm.name}: ${vm.state}` : `${page.vm}: no such VM`;
  if (!vm) return;
  const facts = [
    ['Level', vm.level],
    ['Primary', vm.primary_node || '-'],
    ['Standby', standbyState(vm)],
    ['Generation', vm.generation],
    ['Checkpoint', vm.epoch ?? '-'],
    ['vCPUs / memory', `${vm.definition.vcpus} / ${vm.definition.memory_mib} MiB`],
    ['Preferred node', vm.definition.preferred_node],
    ['Message', vm.message || '-'],
    ...(vm.warnings || []).map((w) => ['Warning', w]),
  ];
  $('#vm-facts').replaceChildren(...facts.flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
}

// --- events and the audit log --------------------------------------------

function renderEvents() {
  if (currentRoute().page !== 'events') return;
  const severity = $('#events-severity').value;
  const alertsOnly = $('#events-alerts').checked;
  const vm = $('#events-vm').value.trim();
  const kind = $('#events-kind').value.trim();
  const text = $('#events-text').value.trim().toLowerCase();
  const shown = state.events
    .filter((e) => !severity || e.severity === severity)
    .filter((e) => !alertsOnly || e.alert)
    .filter((e) => !vm || e.vm === vm)
    .filter((e) => !kind || e.kind === kind)
    .filter((e) => !text || e.message.toLowerCase().includes(text))
    .slice(-500)
    .reverse();
  $('#events tbody').replaceChildren(
    ...shown.map((e) =>
      el(
        'tr',
        { class: `severity-${e.severity}${e.alert ? ' alert' : ''}`, 'data-event': String(e.id) },
        el('td', {}, utc(e.unix_ms)),
        el('td', {}, e.node),
        el('td', {}, e.severity),
        el('td', {}, e.kind),
        el('td', {}, e.vm || '-'),
        el('td', {}, e.message),
      ),
    ),
  );
}

async function loadAudit() {
  try {
    state.audit = await api('GET', '/api/audit?limit=1000');
    renderAudit();
  } catch {
    // The next poll tries again.
  }
}

function renderAudit() {
  const text = $('#audit-text').value.trim().toLowerCase();
  const shown = state.audit
    .filter((a) => !text || `${a.who} ${a.action} ${a.result}`.toLowerCase().includes(text))
    .slice()
    .reverse();
  $('#audit tbody').replaceChildren(
    ...shown.map((a) =>
      el(
        'tr',
        { 'data-audit': String(a.id), class: a.status >= 400 ? 'refused' : '' },
        el('td', {}, utc(a.unix_ms)),
        el('td', {}, a.node),
        el('td', {}, a.who),
        el('td', {}, a.action),
        el('td', {}, a.status),
        el('td', {}, a.result),
      ),
    ),
  );
}

// --- pages -----------------------------------------------------------------

function currentRoute() {
  const hash = location.hash.replace(/^#\/?/, '');
  if (hash.startsWith('vm/')) return { page: 'vm', vm: decodeURIComponent(hash.slice(3)) };
  if (hash === 'events') return { page: 'events' };
  if (hash === 'audit') return { page: 'audit' };
  return { page: 'dashboard' };
}

function route() {
  if (!state.session) return;
  const page = currentRoute();
  $('#dashboard').hidden = page.page !== 'dashboard';
  $('#vm-page').hidden = page.page !== 'vm';
  $('#events-page').hidden = page.page !== 'events';
  $('#audit-page').hidden = page.page !== 'audit';
  for (const link of document.querySelectorAll('#nav a')) {
    link.classList.toggle('current', link.dataset.route === (page.page === 'dashboard' ? '' : page.page));
  }
  if (page.page === 'vm') {
    if (!state.stats || state.stats.vm !== page.vm) startStats(page.vm);
    renderVmFacts();
  } else {
    stopStats();
  }
  if (page.page === 'events') renderEvents();
  if (page.page === 'audit') loadAudit();
}

// --- start -----------------------------------------------------------------

function wire() {
  $('#login-form').addEventListener('submit', logIn);
  $('#logout').addEventListener('click', logOut);
  $('#confirm').addEventListener('close', () => {
    if (confirmed) confirmed($('#confirm').returnValue === 'ok');
    confirmed = null;
  });
  document.addEventListener('click', (event) => {
    const target = event.target.closest('button[data-action]');
    if (!target) return;
    act(target.dataset.action, { node: target.dataset.node, vm: target.dataset.vm });
  });
  for (const id of ['events-severity', 'events-alerts', 'events-vm', 'events-kind', 'events-text']) {
    $(`#${id}`).addEventListener('input', renderEvents);
  }
  $('#audit-text').addEventListener('input', renderAudit);
  window.addEventListener('hashchange', route);
  setInterval(refresh, REFRESH_MS);
}

async function main() {
  wire();
  try {
    const session = await api('GET', '/api/session');
    if (!session.logged_in) {
      showLogin('');
      return;
    }
    state.session = session;
    started();
  } catch (e) {
    showLogin(e.message);
  }
}

main();
