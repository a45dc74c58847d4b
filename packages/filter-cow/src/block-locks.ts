/**
 * Per-block locks for everything that changes the overlay. Requests take the blocks they touch in
 * ascending order, so two requests can never wait for each other in a cycle. An uncontended lock
 * costs one Map entry and no promise.
 */
export class BlockLocks {
  /** Held blocks: null = held, nobody waiting; an array = the waiters, first in first out. */
  private readonly held = new Map<number, Array<() => void> | null>();

  /**
   * Take blocks [first, last]. Returns undefined when they were all free (now held), otherwise a
   * promise that settles once they are all held.
   */
  lock(first: number, last: number): Promise<void> | undefined {
    for (let b = first; b <= last; b++) {
      if (this.held.get(b) !== undefined) return this.lockSlow(b, last);
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
      // unlock() hands the block straight to us: it stays held in between.
      await new Promise<void>((resolve) => {
        if (waiters === null) this.held.set(b, [resolve]);
        else waiters.push(resolve);
      });
    }
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

  /** Number of blocks held right now. */
  get size(): number {
    return this.held.size;
  }
}
