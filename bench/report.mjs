/**
 * Medians, spreads and ratios of the samples, and the markdown tables printed at the end.
 */

export function median(xs) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/**
 * One side's samples of one job, summed up: median, min, max and the spread as ±% (half the
 * range over the median), over the samples that succeeded; the same for CPU seconds per GiB.
 */
export function summarize(samples) {
  const ok = samples.filter((s) => s.ok);
  const values = ok.map((s) => s.value);
  const cpu = ok.map((s) => s.cpuPerGiB).filter((c) => typeof c === 'number');
  const med = median(values);
  const min = values.length ? Math.min(...values) : null;
  const max = values.length ? Math.max(...values) : null;
  return {
    n: values.length,
    failed: samples.length - ok.length,
    median: med,
    min,
    max,
    spreadPct: med ? ((max - min) / 2 / med) * 100 : null,
    cpuPerGiBMedian: median(cpu),
    cpuPerGiBMin: cpu.length ? Math.min(...cpu) : null,
    cpuPerGiBMax: cpu.length ? Math.max(...cpu) : null,
  };
}

/** How many times better nbdx is: nbdx / reference, or reference / nbdx for times. */
export function ratioOf(nbdx, ref, higherIsBetter) {
  if (!nbdx.median || !ref.median) return null;
  return higherIsBetter ? nbdx.median / ref.median : ref.median / nbdx.median;
}

export function fmtValue(v, unit) {
  if (v === null) return '–';
  if (unit === 'IOPS') return `${(v / 1000).toFixed(1)}k IOPS`;
  if (unit === 'MiB/s') return `${v.toFixed(0)} MiB/s`;
  return `${v.toFixed(2)} s`;
}

function fmtSide(sum, unit) {
  if (!sum.n) return sum.failed ? `failed (${sum.failed})` : '–';
  const spread = sum.n > 1 ? ` ±${sum.spreadPct.toFixed(0)}%` : '';
  const failed = sum.failed ? `, ${sum.failed} failed` : '';
  return `${fmtValue(sum.median, unit)}${spread}${failed}`;
}

const fmtCpu = (c) => (c === null ? '–' : c.toFixed(2));

function markdown(rows) {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  const line = (r) => '| ' + r.map((c, i) => c.padEnd(widths[i])).join(' | ') + ' |';
  return [line(rows[0]), '|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|', ...rows.slice(1).map(line)].join('\n');
}

/** The table of one scenario: medians with spread, ratio, server CPU per GiB moved. */
export function scenarioTable(result) {
  const [a, b] = result.labels;
  const rows = [[`job (${result.scenario})`, a, b, 'ratio', 'CPU s/GiB (nbdx / ref)']];
  for (const job of result.jobs) {
    const s = job.summary;
    rows.push([
      job.label,
      fmtSide(s.nbdx, job.unit),
      fmtSide(s.reference, job.unit),
      s.ratio === null ? '–' : s.ratio.toFixed(2),
      `${fmtCpu(s.nbdx.cpuPerGiBMedian)} / ${fmtCpu(s.reference.cpuPerGiBMedian)}`,
    ]);
  }
  return markdown(rows);
}

/** With several scenarios: the ratios side by side, one column per scenario. */
export function ratioTable(results) {
  const rows = [['job', ...results.map((r) => `${r.labels[0]} vs ${r.labels[1]}`)]];
  const labels = [...new Set(results.flatMap((r) => r.jobs.map((j) => j.label)))];
  for (const label of labels) {
    rows.push([
      label,
      ...results.map((r) => {
        const ratio = r.jobs.find((j) => j.label === label)?.summary.ratio;
        return ratio == null ? '–' : ratio.toFixed(2);
      }),
    ]);
  }
  return markdown(rows);
}
