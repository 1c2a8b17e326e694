/*
 * tally/export.h - what libtally.so exports, and the version of these headers.
 * Included first by <tally.h> and by every <tally/...> header that declares
 * functions.
 *
 * Symbol visibility. The library is compiled with -fvisibility=hidden, so a
 * function enters the shared object's dynamic symbol table only when its
 * declaration carries TALLY_EXPORT; a definition takes the visibility of the
 * declaration it follows. TALLY_EXPORT marks exactly the tally_* functions of
 * these headers. The tally__* functions through which the library's layers
 * call one another stay inside libtally.so: no program can bind to them, they
 * cannot clash with a program's own symbols, and calls to them need no PLT
 * entry. Visibility governs the dynamic symbol table only: libtally.a still
 * holds every symbol, for the tests and tools that link it. tools/abi-check
 * fails when the installed library exports anything else.
 *
 * SONAME. The shared library is installed as libtally.so.MAJOR.MINOR.PATCH
 * with the SONAME libtally.so.MAJOR (libtally.so.0). A program records the
 * SONAME, not the file, when it links, and the dynamic loader later loads
 * whichever file carries it. The major number is therefore the binary
 * promise: every libtally.so.0 runs every program linked against an earlier
 * libtally.so.0 without recompiling it. Within one major, a release may add
 * functions, error codes and flags, and fix behaviour to match the documented
 * contracts. A change that a compiled program could notice (a function removed
 * or renamed, a signature changed, a field moved, a constant or enum value
 * changed, a contract narrowed) takes a new major number, hence a new SONAME,
 * and the two libraries install side by side. MINOR counts releases that add
 * to the interface, PATCH releases that only fix.
 *
 * Growing structs. Structs grow only at their end, and a program that zeroes
 * one (or calls its _init function) and sets the fields it knows keeps
 * compiling, and keeps running unchanged, against later libraries. Every
 * exported function carries a symbol version (src/tally.map: TALLY_0.1 for
 * the first release, TALLY_0.2 and TALLY_0.3 for the functions whose structs
 * grew in those releases, and the functions they added);
 * a program binds to the versions it was linked against. When
 * a release adds fields to a struct that the library reads or writes
 * (options, results, statistics, snapshots), each function that takes that
 * struct gets a new version under the same name, and the old version stays,
 * reading and writing the struct as it was: a program built against the
 * smaller struct never makes the library read or write past its end. A new
 * field's zero value always means what the struct meant before it existed.
 * In 0.2, tally_options gained hash: a program linked against 0.1 calls
 * tally_options_init@TALLY_0.1 and tally_open@TALLY_0.1, which touch only the
 * fields 0.1 had and open the engine with hash TALLY_HASH_SIPHASH, the hash
 * 0.1 used, so that its digests stay the same. In 0.3, tally_redis_options
 * gained mode, nodes, master_name, wait_replicas and wait_timeout_ms:
 * tally_flusher_start@TALLY_0.1 reads the Redis options as 0.1 and 0.2 had
 * them (one standalone server); and tally_stats gained lru_evictions:
 * tally_stats_read@TALLY_0.1 writes only the fields 0.1 and 0.2 had.
 *
 * The version macros describe the headers a program was compiled against;
 * they equal meson's project version.
 */
#ifndef TALLY_EXPORT_H
#define TALLY_EXPORT_H

#if defined(__GNUC__) || defined(__clang__)
#define TALLY_EXPORT __attribute__((visibility("default")))
#else
#define TALLY_EXPORT
#endif

#define TALLY_VERSION_MAJOR  0
#define TALLY_VERSION_MINOR  3
#define TALLY_VERSION_PATCH  0
#define TALLY_VERSION_STRING "0.3.0"

#endif /* TALLY_EXPORT_H */
