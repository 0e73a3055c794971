/*
 * wordfreq.c - a WASI *command* sample for spear_nb.
 *
 * Reads all of stdin, splits it into words (runs of ASCII letters and
 * apostrophes, folded to lower case), counts how often each word occurs and
 * prints the 10 most frequent ones as "count word\n" lines, sorted by count
 * descending, then by word ascending (byte order).
 *
 *   - no arguments, no environment variables are used;
 *   - empty input: prints nothing, exits 0;
 *   - input containing a NUL byte: writes "wordfreq: binary input\n" to
 *     stderr and exits 3 (demonstrates the error path: exit code + stderr);
 *   - out of memory: writes "wordfreq: out of memory\n" and exits 2.
 *
 * Build: scripts/build_wasm_samples.sh
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOP_N 10

struct entry {
    char *word;          /* NUL-terminated, lower case; NULL = empty slot */
    unsigned long count;
};

static struct entry *table;
static size_t table_cap;   /* power of two */
static size_t table_len;

static void die(const char *msg, int code) {
    fputs(msg, stderr);
    exit(code);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (!p) die("wordfreq: out of memory\n", 2);
    return p;
}

static unsigned long hash(const char *s, size_t n) {
    unsigned long h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h;
}

static void grow(void) {
    size_t new_cap = table_cap ? table_cap * 2 : 1024;
    struct entry *nt = xmalloc(new_cap * sizeof *nt);
    memset(nt, 0, new_cap * sizeof *nt);
    for (size_t i = 0; i < table_cap; i++) {
        if (!table[i].word) continue;
        size_t j = hash(table[i].word, strlen(table[i].word)) & (new_cap - 1);
        while (nt[j].word) j = (j + 1) & (new_cap - 1);
        nt[j] = table[i];
    }
    free(table);
    table = nt;
    table_cap = new_cap;
}

static void add_word(const char *w, size_t n) {
    if (table_len * 2 >= table_cap) grow();
    size_t j = hash(w, n) & (table_cap - 1);
    while (table[j].word) {
        if (strlen(table[j].word) == n && memcmp(table[j].word, w, n) == 0) {
            table[j].count++;
            return;
        }
        j = (j + 1) & (table_cap - 1);
    }
    char *copy = xmalloc(n + 1);
    memcpy(copy, w, n);
    copy[n] = '\0';
    table[j].word = copy;
    table[j].count = 1;
    table_len++;
}

static int is_word_char(int c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '\'';
}

static int cmp_entry(const void *a, const void *b) {
    const struct entry *x = a, *y = b;
    if (x->count != y->count) return x->count > y->count ? -1 : 1;
    return strcmp(x->word, y->word);
}

int main(void) {
    size_t cap = 1 << 16, len = 0;
    char *buf = xmalloc(cap);
    size_t got;
    while ((got = fread(buf + len, 1, cap - len, stdin)) > 0) {
        len += got;
        if (len == cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) die("wordfreq: out of memory\n", 2);
            buf = nb;
            cap *= 2;
        }
    }
    if (memchr(buf, '\0', len)) die("wordfreq: binary input\n", 3);

    char word[256];
    size_t wn = 0;
    for (size_t i = 0; i <= len; i++) {
        int c = i < len ? (unsigned char)buf[i] : ' ';
        if (is_word_char(c)) {
            if (c >= 'A' && c <= 'Z') c += 'a' - 'A';
            if (wn < sizeof word) word[wn++] = (char)c;
        } else if (wn) {
            /* trim leading/trailing apostrophes (quotes), keep "don't" */
            size_t s = 0, e = wn;
            while (s < e && word[s] == '\'') s++;
            while (e > s && word[e - 1] == '\'') e--;
            if (e > s) add_word(word + s, e - s);
            wn = 0;
        }
    }
    free(buf);

    /* compact the table and sort */
    size_t k = 0;
    for (size_t i = 0; i < table_cap; i++)
        if (table[i].word) table[k++] = table[i];
    qsort(table, k, sizeof *table, cmp_entry);
    for (size_t i = 0; i < k && i < TOP_N; i++)
        printf("%lu %s\n", table[i].count, table[i].word);
    return 0;
}
