/**
 * Per-block locks. A request takes the blocks it touches in ascending order, so two requests can
 * never wait for each other in a cycle; reclaim, which runs while its caller holds blocks, only
 * ever *tries* a lock and skips blocks that are busy. An uncontended lock costs one Map entry and
 * no promise.
 */
export class BlockLocks {
  /** Held blocks: null = held with nobody waiting; an array = the waiters, first come first served. */
  private readonly held = new Map<number, Array<() => void> | null>();

  /** Take blocks [first, last]: undefined when all were free (now held), else a promise. */
  lock(first: number, last: number): Promise<void> | undefined {
    for (let b = first; b <= last; b++) {
      if (this.held.has(b)) return this.lockSlow(b, last);
      this.held.set(b, null);
    }
    return undefined;
  }

  private async lockSlow(from: number, last: number): Promise<void> {
    for (let b = from; b <= last; b++) {
      const waiters = this.held.get(b);
      if (waiters === undefined) {
        this.held.set(b, null);
        continue;
      }
      // unlock() hands the block straight to the first waiter: it stays held in between.
      await new Promise<void>((resolve) => {
        if (waiters === null) this.held.set(b, [resolve]);
        else waiters.push(resolve);
      });
    }
  }

  /** Take one block if nobody holds it. */
  tryLock(b: number): boolean {
    if (this.held.has(b)) return false;
    this.held.set(b, null);
    return true;
  }

  isHeld(b: number): boolean {
    return this.held.has(b);
  }

  unlock(first: number, last: number): void {
    for (let b = first; b <= last; b++) {
      const waiters = this.held.get(b);
      if (waiters && waiters.length > 0) {
        const next = waiters.shift()!;
        if (waiters.length === 0) this.held.set(b, null);
        next();
      } else {
        this.held.delete(b);
      }
    }
  }

  /** Blocks held right now (tests). */
  get size(): number {
    return this.held.size;
  }
}
