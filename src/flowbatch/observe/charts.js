/* flowbatch charts: the bench report and the live dashboard draw with this.
 * Plain browser JavaScript, no dependencies, nothing fetched: each chart is
 * an inline SVG string. FB.renderReport(el, report) draws one pipeline's
 * report; FB.live(el, url, ms) polls the dashboard's JSON and redraws. */
(function () {
  "use strict";
  var COLORS = ["#2563eb", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f", "#7c3aed"];
  var RED = "#dc2626";

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "-";
    var a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (a >= 100 || Number.isInteger(v)) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    if (a >= 1) return v.toFixed(2);
    if (a === 0) return "0";
    return v.toPrecision(2);
  }

  function dur(s) {
    if (s === null || s === undefined || !isFinite(s)) return "-";
    if (s < 1e-6) return "<1 us";
    if (s < 1e-3) return (s * 1e6).toFixed(0) + " us";
    if (s < 1) return (s * 1e3).toFixed(s < 0.01 ? 2 : 1) + " ms";
    return s.toFixed(2) + " s";
  }

  var W = 520, H = 220, L = 52, R = 12, T = 28, B = 34;

  function frame(title, ymax, yfmt, xmax, xlabel) {
    var out = ['<svg viewBox="0 0 ' + W + " " + H + '" class="chart" role="img" aria-label="' + esc(title) + '">'];
    out.push('<text x="' + L + '" y="16" class="title">' + esc(title) + "</text>");
    for (var i = 0; i <= 4; i++) {
      var y = T + (H - T - B) * (1 - i / 4);
      out.push('<line x1="' + L + '" x2="' + (W - R) + '" y1="' + y + '" y2="' + y + '" class="grid"/>');
      out.push('<text x="' + (L - 6) + '" y="' + (y + 4) + '" class="tick" text-anchor="end">' + esc(yfmt(ymax * i / 4)) + "</text>");
    }
    if (xmax !== null) {
      var step = niceMax(xmax / 5);
      for (var xv = 0; xv <= xmax + 1e-9; xv += step) {
        var x = L + (W - L - R) * xv / xmax;
        out.push('<text x="' + x.toFixed(1) + '" y="' + (H - B + 16) + '" class="tick" text-anchor="middle">' + esc(fmt(xv)) + "</text>");
      }
      out.push('<text x="' + (W - R) + '" y="' + (H - 4) + '" class="tick" text-anchor="end">' + esc(xlabel) + "</text>");
    }
    return out;
  }

  /* series: [{name, color, points: [[x, y|null], ...]}] */
  function lineChart(title, series, yfmt, xlabel) {
    var xmax = 0, ymax = 0;
    series.forEach(function (s) {
      s.points.forEach(function (p) {
        if (p[0] > xmax) xmax = p[0];
        if (p[1] !== null && p[1] > ymax) ymax = p[1];
      });
    });
    xmax = xmax || 1;
    ymax = niceMax(ymax);
    var out = frame(title, ymax, yfmt, xmax, xlabel);
    var sx = function (x) { return L + (W - L - R) * x / xmax; };
    var sy = function (y) { return T + (H - T - B) * (1 - y / ymax); };
    series.forEach(function (s, k) {
      var d = "", pen = false;
      s.points.forEach(function (p) {
        if (p[1] === null || !isFinite(p[1])) { pen = false; return; }
        d += (pen ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1);
        pen = true;
      });
      out.push('<path d="' + d + '" fill="none" stroke="' + s.color + '" stroke-width="2"/>');
      var lx = L + 8 + k * 110;
      out.push('<rect x="' + lx + '" y="' + (H - 14) + '" width="10" height="3" fill="' + s.color + '"/>');
      out.push('<text x="' + (lx + 14) + '" y="' + (H - 10) + '" class="legend">' + esc(s.name) + "</text>");
    });
    if (!series.some(function (s) { return s.points.length; })) {
      out.push('<text x="' + (W / 2) + '" y="' + (H / 2) + '" class="tick" text-anchor="middle">no data yet</text>');
    }
    out.push("</svg>");
    return out.join("");
  }

  /* bars: [{label, value (0..1), note, hot}] as horizontal bars */
  function utilBars(title, bars) {
    var rowH = 26, h = T + bars.length * rowH + 12, lw = 100, bw = W - lw - 230;
    var out = ['<svg viewBox="0 0 ' + W + " " + h + '" class="chart" role="img" aria-label="' + esc(title) + '">'];
    out.push('<text x="' + L + '" y="16" class="title">' + esc(title) + "</text>");
    bars.forEach(function (b, i) {
      var y = T + i * rowH, v = Math.max(0, Math.min(1, b.value || 0));
      var color = b.hot ? RED : v >= 0.8 ? "#f59e0b" : "#22c55e";
      out.push('<text x="' + (lw - 8) + '" y="' + (y + 15) + '" class="label" text-anchor="end"' + (b.hot ? ' font-weight="bold" fill="' + RED + '"' : "") + ">" + esc(b.label) + "</text>");
      out.push('<rect x="' + lw + '" y="' + (y + 3) + '" width="' + bw + '" height="16" class="track"/>');
      out.push('<rect x="' + lw + '" y="' + (y + 3) + '" width="' + (bw * v).toFixed(1) + '" height="16" fill="' + color + '"/>');
      out.push('<text x="' + (lw + bw + 6) + '" y="' + (y + 15) + '" class="label">' + esc((v * 100).toFixed(0) + "% " + (b.note || "")) + "</text>");
    });
    out.push("</svg>");
    return out.join("");
  }

  /* bins: [[size, count], ...]; maxSize: the stage's max_size (a marker) */
  function histogram(title, bins, maxSize) {
    var top = maxSize || 1, cmax = 0;
    bins.forEach(function (b) { if (b[0] > top) top = b[0]; if (b[1] > cmax) cmax = b[1]; });
    cmax = niceMax(cmax);
    var out = frame(title, cmax, fmt, null, "");
    var pw = W - L - R, slot = pw / top, bw = Math.max(1, slot - 1);
    bins.forEach(function (b) {
      var x = L + (b[0] - 1) * slot, bh = (H - T - B) * b[1] / cmax;
      out.push('<rect x="' + x.toFixed(1) + '" y="' + (H - B - bh).toFixed(1) + '" width="' + bw.toFixed(1) + '" height="' + bh.toFixed(1) + '" fill="' + COLORS[0] + '"><title>' + esc(b[0] + " items: " + b[1] + " batches") + "</title></rect>");
    });
    [1, Math.ceil(top / 4), Math.ceil(top / 2), Math.ceil(3 * top / 4), top].forEach(function (s) {
      out.push('<text x="' + (L + (s - 0.5) * slot).toFixed(1) + '" y="' + (H - B + 16) + '" class="tick" text-anchor="middle">' + s + "</text>");
    });
    if (maxSize) {
      var mx = L + maxSize * slot;
      out.push('<line x1="' + mx + '" x2="' + mx + '" y1="' + T + '" y2="' + (H - B) + '" stroke="' + RED + '" stroke-dasharray="4 3"/>');
      out.push('<text x="' + (mx - 4) + '" y="' + (T + 12) + '" class="tick" text-anchor="end" fill="' + RED + '">max_size ' + maxSize + "</text>");
    }
    out.push('<text x="' + (W - R) + '" y="' + (H - 4) + '" class="tick" text-anchor="end">items per batch</text>');
    out.push("</svg>");
    return out.join("");
  }

  function stageTable(stages, neck) {
    var h = ["stage", "executor", "workers", "items", "failed", "busy", "mean batch", "call p50", "call p99", "wait p50"];
    var out = ['<table class="stages"><thead><tr>' + h.map(function (x) { return "<th>" + x + "</th>"; }).join("") + "</tr></thead><tbody>"];
    stages.forEach(function (s) {
      var batch = s.batch_max_size ? fmt(s.mean_batch_size) + " / " + s.batch_max_size : s.batches ? fmt(s.mean_batch_size) : "-";
      out.push("<tr" + (s.name === neck ? ' class="neck"' : "") + "><td>" + esc(s.name) + (s.name === neck ? " &#9664; bottleneck" : "") +
        "</td><td>" + esc(s.executor) + "</td><td>" + s.workers + "</td><td>" + s.done + "</td><td>" + s.failed +
        "</td><td>" + (100 * s.utilization).toFixed(0) + "%</td><td>" + batch + "</td><td>" + dur(s.service_time.p50) +
        "</td><td>" + dur(s.service_time.p99) + "</td><td>" + dur(s.queue_wait.p50) + "</td></tr>");
    });
    out.push("</tbody></table>");
    return out.join("");
  }

  /* report: {title, subtitle, cards: [[label, value]], advice: [..], bottleneck,
   *          timeline: [{t, items_per_s, errors_per_s, p50, p99, util: {}}], stages: [...]} */
  function renderReport(el, r) {
    var tl = r.timeline || [];
    var html = ['<section class="report">'];
    html.push("<h2>" + esc(r.title) + "</h2>");
    if (r.subtitle) html.push('<p class="sub">' + esc(r.subtitle) + "</p>");
    html.push('<div class="cards">' + (r.cards || []).map(function (c) {
      return '<div class="card"><div class="v">' + esc(c[1]) + '</div><div class="k">' + esc(c[0]) + "</div></div>";
    }).join("") + "</div>");
    if (r.advice && r.advice.length) {
      html.push('<ul class="advice">' + r.advice.map(function (a) { return "<li>" + esc(a) + "</li>"; }).join("") + "</ul>");
    }
    var grid = [];
    grid.push(lineChart("Throughput (items/s)", [
      { name: "completed/s", color: COLORS[0], points: tl.map(function (p) { return [p.t, p.items_per_s]; }) },
      { name: "failed/s", color: RED, points: tl.map(function (p) { return [p.t, p.errors_per_s]; }) }
    ], fmt, "seconds"));
    grid.push(lineChart("Latency (ms)", [
      { name: "p50", color: COLORS[1], points: tl.map(function (p) { return [p.t, p.p50 === null ? null : p.p50 * 1e3]; }) },
      { name: "p99", color: COLORS[3], points: tl.map(function (p) { return [p.t, p.p99 === null ? null : p.p99 * 1e3]; }) }
    ], fmt, "seconds"));
    grid.push(lineChart("Utilization over time (%)", r.stages.map(function (s, i) {
      return {
        name: s.name, color: s.name === r.bottleneck ? RED : COLORS[(i + 2) % COLORS.length],
        points: tl.map(function (p) { var u = p.util ? p.util[s.name] : undefined; return [p.t, u === undefined ? null : 100 * u]; })
      };
    }), function (v) { return v.toFixed(0); }, "seconds"));
    grid.push(utilBars("Utilization per stage" + (r.util_label ? " (" + r.util_label + ")" : ""), r.stages.map(function (s) {
      return { label: s.name, value: s.utilization, hot: s.name === r.bottleneck, note: s.workers + " worker" + (s.workers === 1 ? "" : "s") + ", " + fmt(s.queued) + " " + (r.queue_note || "queued") };
    })));
    r.stages.forEach(function (s) {
      if (s.batches) grid.push(histogram("Batch sizes: " + s.name + " (mean " + fmt(s.mean_batch_size) + ")", s.batch_sizes, s.batch_max_size));
    });
    html.push('<div class="grid">' + grid.map(function (g) { return '<div class="cell">' + g + "</div>"; }).join("") + "</div>");
    html.push(stageTable(r.stages, r.bottleneck));
    html.push("</section>");
    el.innerHTML = html.join("");
  }

  var KEEP = 300;

  /* Poll url (the dashboard's JSON) every ms; keep a timeline per pipeline.
   * Every figure (rates, quantiles, utilization, the bottleneck) comes computed
   * in the JSON (its "recent" part: since the previous poll); this only draws. */
  function live(el, url, ms) {
    var state = {};
    function tick() {
      fetch(url, { cache: "no-store" }).then(function (r) { return r.json(); }).then(function (data) {
        var names = Object.keys(data.pipelines);
        names.forEach(function (name) {
          var cur = data.pipelines[name], st = state[name];
          if (!st) st = state[name] = { t0: data.t, tl: [], util: {}, neck: null };
          var rec = cur.recent;
          if (rec) {
            st.util = rec.utilization;
            st.neck = rec.bottleneck;
            st.tl.push({
              t: data.t - st.t0,
              items_per_s: rec.items_per_s,
              errors_per_s: rec.errors_per_s,
              p50: rec.p50,
              p99: rec.p99,
              util: rec.utilization
            });
            if (st.tl.length > KEEP) st.tl.shift();
          }
          var last = st.tl.length ? st.tl[st.tl.length - 1] : null;
          var neck = st.neck;
          var stages = cur.stages.map(function (s) {
            var c = {}; for (var k in s) c[k] = s[k];
            if (st.util[s.name] !== undefined) c.utilization = st.util[s.name];
            return c;
          });
          var box = document.getElementById("fb-p-" + name);
          if (!box) {
            box = document.createElement("div");
            box.id = "fb-p-" + name;
            el.appendChild(box);
          }
          renderReport(box, {
            title: "pipeline " + name,
            subtitle: "live, every " + (ms / 1000) + " s; up " + fmt(cur.elapsed) + " s; advice from figures since start",
            cards: [
              ["items/s", fmt(last ? last.items_per_s : cur.items_per_s)],
              ["in flight", String(cur.in_flight)],
              ["latency p50", dur(last ? last.p50 : cur.latency.p50)],
              ["latency p99", dur(last ? last.p99 : cur.latency.p99)],
              ["failed", String(cur.failed)],
              ["bottleneck", neck || cur.bottleneck || "-"]
            ],
            advice: cur.advice,
            bottleneck: neck || cur.bottleneck,
            util_label: "last " + (ms / 1000) + " s",
            timeline: st.tl,
            stages: stages
          });
        });
        var status = document.getElementById("fb-status");
        if (status) status.textContent = names.length ? "" : "no pipelines are running";
      }).catch(function (e) {
        var status = document.getElementById("fb-status");
        if (status) status.textContent = "cannot read " + url + ": " + e;
      }).then(function () { setTimeout(tick, ms); });
    }
    tick();
  }

  window.FB = { renderReport: renderReport, live: live, fmt: fmt, dur: dur };
})();
