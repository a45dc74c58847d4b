/**
 * Merges reads of neighbouring bytes of one object that arrive together into one ranged GET.
 *
 * An S3 request has a high fixed cost: radosgw here serves 256 KiB ranged GETs at ~140 MiB/s but
 * 1 MiB GETs at ~450 MiB/s (see the README). NBD clients read in smaller pieces (nbdcopy 256 KiB,
 * qemu-img 2 MiB at most) and keep many requests in flight, so the reads the core hands us in
 * one turn of the event loop are often adjacent. Reads are collected until the loop has dispatched
 * everything that arrived (setImmediate), then every run of touching or overlapping ranges of
 * one key becomes one GET whose body is copied straight into each read's buffer.
 */
import type { GetResult, Store } from './store.js';

/** A merged GET never grows beyond this (and, for prefix= disks, never beyond an object). */
export const MAX_MERGED_READ = 8 * 1024 * 1024;

interface Pending {
  start: number;
  target: Uint8Array;
  resolve: (r: GetResult | null) => void;
  reject: (e: unknown) => void;
}

export class ReadCoalescer {
  /** key + '\0' + ifMatch → reads waiting for the end of this turn. */
  private waiting = new Map<string, { key: string; ifMatch: string | undefined; reads: Pending[] }>();
  private scheduled = false;
  /** GETs sent and reads served, for the README's figures and debugging. */
  readonly stats = { gets: 0, reads: 0 };

  constructor(private readonly store: Store) {}

  /**
   * Fill `target` with the object's bytes from `start` (fewer when the object is shorter; null
   * when there is no such object), possibly sharing one GET with neighbouring reads.
   */
  read(key: string, start: number, target: Uint8Array, ifMatch?: string): Promise<GetResult | null> {
    return new Promise((resolve, reject) => {
      const id = ifMatch ? `${key}\0${ifMatch}` : key;
      let group = this.waiting.get(id);
      if (!group) {
        group = { key, ifMatch, reads: [] };
        this.waiting.set(id, group);
      }
      group.reads.push({ start, target, resolve, reject });
      if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(() => this.dispatch());
      }
    });
  }

  private dispatch(): void {
    this.scheduled = false;
    const groups = this.waiting;
    this.waiting = new Map();
    for (const { key, ifMatch, reads } of groups.values()) {
      if (reads.length === 1) {
        this.send(key, ifMatch, reads);
        continue;
      }
      reads.sort((a, b) => a.start - b.start);
      let run: Pending[] = [reads[0]!];
      let runStart = reads[0]!.start;
      let runEnd = runStart + reads[0]!.target.length;
      for (let i = 1; i < reads.length; i++) {
        const r = reads[i]!;
        const end = r.start + r.target.length;
        if (r.start <= runEnd && Math.max(runEnd, end) - runStart <= MAX_MERGED_READ) {
          run.push(r);
          runEnd = Math.max(runEnd, end);
        } else {
          this.send(key, ifMatch, run);
          run = [r];
          runStart = r.start;
          runEnd = end;
        }
      }
      this.send(key, ifMatch, run);
    }
  }

  private send(key: string, ifMatch: string | undefined, run: Pending[]): void {
    this.stats.gets++;
    this.stats.reads += run.length;
    const start = run[0]!.start;
    let end = start;
    for (const r of run) end = Math.max(end, r.start + r.target.length);
    const sink =
      run.length === 1
        ? (chunk: Buffer, pos: number) => run[0]!.target.set(chunk, pos)
        : (chunk: Buffer, pos: number) => {
            // chunk covers [start+pos, start+pos+len): copy its overlap with each read
            const cs = start + pos;
            const ce = cs + chunk.length;
            for (const r of run) {
              const s = Math.max(cs, r.start);
              const e = Math.min(ce, r.start + r.target.length);
              if (s < e) r.target.set(chunk.subarray(s - cs, e - cs), s - r.start);
            }
          };
    this.store.get(key, start, end - start, sink, ifMatch).then(
      (got) => {
        for (const r of run) {
          if (got === null) r.resolve(null);
          else r.resolve({ bytes: Math.max(0, Math.min(r.target.length, start + got.bytes - r.start)), etag: got.etag });
        }
      },
      (err: unknown) => {
        for (const r of run) r.reject(err);
      },
    );
  }
}
