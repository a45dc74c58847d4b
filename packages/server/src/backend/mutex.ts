/**
 * A FIFO async semaphore with `slots` holders at once; a Mutex is the one-slot case. The
 * thread-model locks and the per-connection request limit (-t) are built from it.
 */
export class Semaphore {
  private held = 0;
  private waiters: Array<() => void> = [];

  constructor(private readonly slots: number) {}

  async run<T>(fn: () => Promise<T> | T): Promise<T> {
    await this.acquire();
    try {
      return await fn();
    } finally {
      this.release();
    }
  }

  acquire(): Promise<void> {
    if (this.held < this.slots) {
      this.held++;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  release(): void {
    const next = this.waiters.shift();
    // The slot passes straight to the next waiter (first come, first served).
    if (next) next();
    else this.held--;
  }
}

export class Mutex extends Semaphore {
  constructor() {
    super(1);
  }
}
