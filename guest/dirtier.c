/*
 * dirtier: the lab guest's memory load, like `stress --vm 1 --vm-bytes N`, with a check.
 *
 * Runs as the guest's init (exec'd by guest/init). Reads from /proc/cmdline (or, for a test
 * outside the guest, from its first argument):
 *   stress_mb=N     MiB to keep dirtying (0: idle, heartbeats only)
 *   stress_rate=R   MiB/s of pages dirtied (one page = 4 KiB counted as dirtied); 0 = unlimited
 *   stress_fill=F   page contents besides the one word: `zero` (default; pages stay zero except
 *                   the word, so streams compress well) or `random` (pseudo-random bytes written
 *                   once at start, incompressible)
 *
 * It allocates N MiB and writes one 64-bit word at the start of every 4 KiB page, pass after
 * pass. Before overwriting, it checks that the page still holds the previous pass's value;
 * any difference is memory corruption (e.g. a page lost by a migration) and is counted.
 *
 * On the console (ttyS0) it prints, once a second:
 *   dirtier: t=SECONDS passes=P rate_mib_s=R errors=E
 * and for the first corruptions seen:
 *   dirtier: CORRUPT page=I pass=P expected=0x... got=0x...
 * Lines are written with write(2), one call per line, so they reach the console whole.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define CHUNK_PAGES 256UL /* 1 MiB: rate limit and clock checks happen once per chunk */
#define MAX_REPORTS 20

static void say(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	const char *p = buf;
	while (n > 0) {
		ssize_t w = write(1, p, (size_t)n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		p += w;
		n -= (int)w;
	}
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns)
{
	struct timespec ts = { (time_t)(ns / 1000000000ULL), (long)(ns % 1000000000ULL) };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* Value of page i after pass p (pass 0 = the initial fill). Never zero. */
static inline uint64_t val(uint64_t p, uint64_t i)
{
	return ((p + 1) << 32) | (i & 0xffffffffULL);
}

/* Finds `key=` as a whole word in the command line; copies its value. */
static int param(const char *cmdline, const char *key, char *out, size_t outlen)
{
	size_t kl = strlen(key);
	const char *s = cmdline;
	while (*s) {
		while (*s == ' ' || *s == '\n' || *s == '\t')
			s++;
		if (!*s)
			break;
		const char *e = s;
		while (*e && *e != ' ' && *e != '\n' && *e != '\t')
			e++;
		if ((size_t)(e - s) > kl && strncmp(s, key, kl) == 0 && s[kl] == '=') {
			size_t vl = (size_t)(e - s) - kl - 1;
			if (vl >= outlen)
				vl = outlen - 1;
			memcpy(out, s + kl + 1, vl);
			out[vl] = 0;
			return 1;
		}
		s = e;
	}
	return 0;
}

int main(int argc, char **argv)
{
	char cmdline[4096] = "";
	FILE *f = NULL;
	if (argc > 1) /* testing outside the guest: the parameters as one argument */
		snprintf(cmdline, sizeof cmdline, "%s", argv[1]);
	else
		f = fopen("/proc/cmdline", "r");
	if (f) {
		size_t n = fread(cmdline, 1, sizeof cmdline - 1, f);
		cmdline[n] = 0;
		fclose(f);
	} else if (argc <= 1) {
		say("dirtier: cannot read /proc/cmdline (%s); using defaults", strerror(errno));
	}

	char v[64];
	uint64_t mb = 0, rate = 0;
	char fill[64] = "zero";
	if (param(cmdline, "stress_mb", v, sizeof v))
		mb = strtoull(v, NULL, 10);
	if (param(cmdline, "stress_rate", v, sizeof v))
		rate = strtoull(v, NULL, 10);
	if (param(cmdline, "stress_fill", v, sizeof v))
		snprintf(fill, sizeof fill, "%s", v);
	int random_fill = strcmp(fill, "random") == 0;
	if (!random_fill && strcmp(fill, "zero") != 0) {
		say("dirtier: unknown stress_fill=%s, using zero", fill);
		snprintf(fill, sizeof fill, "zero");
	}

	uint64_t npages = mb * (1024 * 1024 / PAGE);
	say("dirtier: start stress_mb=%llu stress_rate=%llu stress_fill=%s pages=%llu",
	    (unsigned long long)mb, (unsigned long long)rate, fill, (unsigned long long)npages);

	uint64_t *base = NULL;
	if (npages) {
		void *m = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
		if (m == MAP_FAILED) {
			say("dirtier: mmap of %llu MiB failed: %s", (unsigned long long)mb,
			    strerror(errno));
			for (;;)
				pause();
		}
		base = m;
		uint64_t x = 0x9e3779b97f4a7c15ULL;
		for (uint64_t i = 0; i < npages; i++) {
			volatile uint64_t *pg = base + i * (PAGE / 8);
			if (random_fill) {
				for (size_t w = 1; w < PAGE / 8; w++) {
					x ^= x << 13;
					x ^= x >> 7;
					x ^= x << 17;
					pg[w] = x;
				}
			}
			pg[0] = val(0, i);
		}
	}

	const uint64_t t0 = now_ns();
	uint64_t next_hb = t0 + 1000000000ULL;
	uint64_t passes = 0, errors = 0, reports = 0;
	uint64_t pages_total = 0;         /* pages dirtied since start (for the rate limit) */
	uint64_t pages_at_hb = 0, t_at_hb = t0;
	uint64_t since_check = 0;
	uint64_t rate_t0 = t0, rate_pages0 = 0; /* rate limit origin (reset after a stall) */

	say("dirtier: running");
	for (;;) {
		if (!npages) {
			sleep_ns(1000000000ULL);
			uint64_t t = now_ns();
			say("dirtier: t=%llu passes=0 rate_mib_s=0 errors=0",
			    (unsigned long long)((t - t0) / 1000000000ULL));
			continue;
		}
		uint64_t p = passes + 1;
		for (uint64_t i = 0; i < npages; i++) {
			volatile uint64_t *w = base + i * (PAGE / 8);
			uint64_t exp = val(p - 1, i);
			uint64_t got = *w;
			if (got != exp) {
				errors++;
				if (reports < MAX_REPORTS) {
					reports++;
					say("dirtier: CORRUPT page=%llu pass=%llu expected=0x%016llx got=0x%016llx",
					    (unsigned long long)i, (unsigned long long)p,
					    (unsigned long long)exp, (unsigned long long)got);
				}
			}
			*w = val(p, i);
			pages_total++;
			if (++since_check < CHUNK_PAGES && i + 1 < npages)
				continue;
			since_check = 0;
			uint64_t t = now_ns();
			if (rate) {
				/* Time at which pages_total pages are due at `rate` MiB/s. */
				unsigned __int128 ns = (unsigned __int128)(pages_total - rate_pages0) *
						       PAGE * 1000000000ULL / (rate * 1024 * 1024);
				uint64_t due = rate_t0 + (uint64_t)ns;
				if (due > t) {
					sleep_ns(due - t);
					t = now_ns();
				} else if (t - due > 1000000000ULL) {
					/* More than 1 s behind (the VM was paused, or the rate is more
					 * than the guest can do): restart the schedule, no catch-up burst. */
					rate_t0 = t;
					rate_pages0 = pages_total;
				}
			}
			if (t >= next_hb) {
				uint64_t dt = t - t_at_hb;
				unsigned __int128 b = (unsigned __int128)(pages_total - pages_at_hb) * PAGE;
				uint64_t r = dt ? (uint64_t)(b * 1000000000ULL / dt / (1024 * 1024)) : 0;
				/* passes completed so far, counting the one in progress as not done */
				say("dirtier: t=%llu passes=%llu rate_mib_s=%llu errors=%llu",
				    (unsigned long long)((t - t0) / 1000000000ULL),
				    (unsigned long long)passes, (unsigned long long)r,
				    (unsigned long long)errors);
				pages_at_hb = pages_total;
				t_at_hb = t;
				next_hb += 1000000000ULL;
				if (next_hb <= t)
					next_hb = t + 1000000000ULL;
			}
		}
		passes = p;
	}
}
