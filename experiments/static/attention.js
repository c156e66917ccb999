// attnlab's page of a text's attention: the tokens as text; hover (or click, to pin) a token to colour the others
// by the attention it gives or receives, in the chosen layer and head, on a linear or log scale. No network.
function attnlabF16(u) {
  const s = (u & 0x8000) ? -1 : 1, e = (u >> 10) & 0x1f, f = u & 0x3ff;
  if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * Math.pow(2, e - 15) * (1 + f / 1024);
}
function attnlabTextView(rootId, data) {
  const root = document.getElementById(rootId);
  const bytes = Uint8Array.from(atob(data.attention), c => c.charCodeAt(0));
  const words = new Uint16Array(bytes.buffer);
  const [L, H, S] = data.shape;
  const at = (l, h, q, k) => attnlabF16(words[((l * H + h) * S + q) * S + k]);
  const ui = root.querySelector('.controls');
  const layer = ui.querySelector('.layer'), head = ui.querySelector('.head');
  const mode = ui.querySelector('.mode'), scale = ui.querySelector('.scale');
  for (let l = 0; l < L; l++) layer.add(new Option('layer ' + l, l));
  for (let h = 0; h < H; h++) head.add(new Option('head ' + h, h));
  const box = root.querySelector('.tokens'), info = root.querySelector('.info');
  const spans = data.tokens.map((t, i) => {
    const s = document.createElement('span');
    s.className = 'tok'; s.textContent = t; s.dataset.i = i; s.title = 'position ' + i;
    box.appendChild(s); box.appendChild(document.createTextNode(' '));
    return s;
  });
  let pinned = null;
  function shade(v) {
    if (!(v > 0)) return 0;
    if (scale.value === 'log') return Math.max(0, Math.min(1, (Math.log10(v) + 4) / 4));
    return Math.min(1, v);
  }
  function paint(i) {
    const l = +layer.value, h = +head.value, given = mode.value === 'given';
    spans.forEach((s, j) => {
      const v = given ? at(l, h, i, j) : at(l, h, j, i);
      s.style.backgroundColor = 'rgba(49,130,189,' + shade(v).toFixed(3) + ')';
      s.dataset.value = v;
      s.classList.toggle('focus', j === i);
    });
    info.textContent = 'L' + layer.value + 'H' + head.value + ': attention ' + (given ? 'from' : 'to') +
      ' "' + data.tokens[i] + '" (position ' + i + ')' + (pinned === null ? '' : ' - pinned; click it again to free');
  }
  spans.forEach((s, i) => {
    s.addEventListener('mouseenter', () => { if (pinned === null) paint(i); });
    s.addEventListener('click', () => { pinned = (pinned === i) ? null : i; paint(i); });
  });
  [layer, head, mode, scale].forEach(c => c.addEventListener('change', () => paint(pinned === null ? 0 : pinned)));
  paint(0);
}
