/* A stand-in of the macOS frameworks the ANE bridge (src/orion/runtime/backends/ane.py) loads, so that the bridge's
 * real ctypes code runs on Linux CI: libobjc (classes, selectors, objc_msgSend, autorelease pools), the Foundation
 * and CoreFoundation objects the bridge builds, IOSurface, sysctlbyname, and the private AppleNeuralEngine classes.
 *
 * Written from the team's reference notes (/work/shared/ane-reference.md sections 2, 4 and 5), not from the bridge:
 * every argument is checked against what the reference says the real frameworks need, and a mismatch fails loudly.
 *   - What the real framework reports with NO + NSError (or a nil result), the stand-in reports the same way, with a
 *     description that says exactly what was wrong; each such failure is also counted (standin_failures) and its
 *     text kept (standin_last_failure) so a test can assert the bridge failed loudly.
 *   - What the real runtime raises an Objective-C exception for (an unrecognized selector, nil in a collection, a
 *     NULL C string, MIL text as NSString, a nil weights dictionary, a message to a deallocated object) kills the
 *     process: the stand-in prints the reason on stderr and calls abort(), as an uncaught exception would.
 *
 * Calling convention. The bridge casts objc_msgSend to one fixed prototype per selector (pointer, unsigned int, int
 * and size arguments; BOOL, pointer, integer or void results), because arm64 macOS forbids variadic calls to it. Here
 * objc_msgSend is a variadic C function that reads its arguments with va_arg by selector. On x86-64 (System V) and
 * arm64 Linux (AAPCS64) a fixed-arity call passes integer-class arguments in the same registers, then on the stack
 * in the same order, as a variadic call does, so va_arg finds each one; a 32-bit argument is read as its own type.
 * BOOL results are returned as 0/1 in the pointer-sized return register, whose low byte is what a bool reader sees.
 *
 * Evaluation. A compiled model is run by a callback (standin_set_callback) that gets the directory of the program as
 * compiled (model.mil + its weight files, rebuilt from net.plist and data) at load, and the surfaces' memory in
 * binding order at evaluate. If no callback is set when one is needed, the module named by $ORION_STANDIN_EMULATOR is
 * imported through the embedding Python's C API (the process is a Python process: the test's, or an `orion doctor`
 * child), and that module registers one.
 *
 * Objects: every object the stand-in allocates is counted while alive (standin_live_objects); alloc/new/copy-style
 * constructors (CFNumberCreate, CFDictionaryCreate, IOSurfaceCreate) return +1 objects, class-method constructors
 * return autoreleased ones, as Foundation does. Deallocated objects stay behind as zombies so that a later message
 * to one is caught.
 *
 * Rules the reference does not state but the stand-in enforces (from the issue that asked for it, conservative):
 * a request's surfaces are mapped into the model at its first evaluation, and that mapping belongs to one load of
 * one model: a request must be rebuilt after unload/load.
 */

#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

typedef signed char BOOL;

/* ------------------------------------------------------------------------------------------------------------------
 * Failures */

static pthread_mutex_t failure_lock = PTHREAD_MUTEX_INITIALIZER;
static long failure_count;
static char last_failure[8192];

/* A failure the real framework reports (NO/nil): counted, kept, printed. */
static void failure(const char *fmt, ...) {
    char text[sizeof last_failure];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&failure_lock);
    failure_count++;
    memcpy(last_failure, text, sizeof text);
    pthread_mutex_unlock(&failure_lock);
    fprintf(stderr, "orion-standin: %s\n", text);
}

/* What the real runtime raises an Objective-C exception for: the process dies. */
__attribute__((noreturn)) static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "orion-standin: terminating with uncaught exception: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    fflush(stderr);
    abort();
}

EXPORT long standin_failures(void) { return failure_count; }
EXPORT const char *standin_last_failure(void) { return last_failure; }

/* ------------------------------------------------------------------------------------------------------------------
 * Classes and objects */

typedef struct Class {
    const char *name;
    const char *const *class_methods;    /* NULL-terminated selector names */
    const char *const *instance_methods;
} Class;

static const char *const no_methods[] = {NULL};
static const char *const string_class_methods[] = {"stringWithUTF8String:", NULL};
static const char *const string_methods[] = {"UTF8String", "description", NULL};
static const char *const data_class_methods[] = {"dataWithBytes:length:", NULL};
static const char *const dict_class_methods[] = {"dictionaryWithObjects:forKeys:count:", NULL};
static const char *const array_class_methods[] = {"arrayWithObjects:count:", NULL};
static const char *const number_class_methods[] = {"numberWithInt:", NULL};
static const char *const describable[] = {"description", NULL};
static const char *const error_methods[] = {"domain", "code", "userInfo", "localizedDescription", "description", NULL};
static const char *const descriptor_class_methods[] = {"modelWithMILText:weights:optionsPlist:", NULL};
static const char *const model_class_methods[] = {"inMemoryModelWithDescriptor:", NULL};
static const char *const model_methods[] = {"hexStringIdentifier", "compileWithQoS:options:error:",
                                            "loadWithQoS:options:error:", "evaluateWithQoS:options:request:error:",
                                            "unloadWithQoS:error:", NULL};
static const char *const request_class_methods[] = {
    "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:", NULL};
static const char *const surface_object_class_methods[] = {"objectWithIOSurface:", NULL};

static const Class NSString = {"NSString", string_class_methods, string_methods};
static const Class NSData = {"NSData", data_class_methods, describable};
static const Class NSDictionary = {"NSDictionary", dict_class_methods, describable};
static const Class NSArray = {"NSArray", array_class_methods, describable};
static const Class NSNumber = {"NSNumber", number_class_methods, describable};
static const Class NSError = {"NSError", no_methods, error_methods};
static const Class Descriptor = {"_ANEInMemoryModelDescriptor", descriptor_class_methods, no_methods};
static const Class Model = {"_ANEInMemoryModel", model_class_methods, model_methods};
static const Class Request = {"_ANERequest", request_class_methods, no_methods};
static const Class SurfaceObject = {"_ANEIOSurfaceObject", surface_object_class_methods, no_methods};
static const Class IOSurface = {"IOSurface", no_methods, no_methods};

static const Class *const classes[] = {&NSString, &NSData, &NSDictionary, &NSArray, &NSNumber, &NSError,
                                       &Descriptor, &Model, &Request, &SurfaceObject, &IOSurface};
#define CLASS_COUNT (sizeof classes / sizeof classes[0])
static const char *const object_methods[] = {"retain", "release", "autorelease", NULL};

enum ModelState { CREATED, COMPILED, LOADED };

typedef struct Object Object;
struct Object {
    const Class *isa;
    long refs;          /* 0: deallocated (a zombie) */
    bool immortal;      /* the IOSurface property keys: constants, never counted */
    /* NSString (NUL-terminated) and NSData */
    char *bytes;
    size_t length;
    /* NSDictionary (keys, items) and NSArray (items) */
    Object **keys, **items;
    size_t count;
    /* NSNumber */
    long long number;
    /* NSError */
    Object *domain, *user_info;
    long code;
    /* _ANEInMemoryModelDescriptor */
    Object *mil, *weights;
    /* _ANEInMemoryModel */
    Object *descriptor;
    char identifier[33];
    enum ModelState state;
    long load_id;
    char *compiled_plist; /* what its own compile produced: loads even if net.plist is not in the directory */
    /* _ANERequest: the arrays it was built from, and the load its surfaces were mapped for (0: not yet) */
    Object *inputs, *outputs, *input_indices, *output_indices, *procedure;
    long mapped_load_id;
    /* _ANEIOSurfaceObject */
    Object *surface;
    /* IOSurface */
    void *memory;
    size_t alloc_size;
    int locks;
    uint32_t lock_options;
};

static pthread_mutex_t object_lock;
static long live_objects;

/* Every object ever allocated (zombies included): an open-addressing set, so any pointer can be checked. */
static Object **table;
static size_t table_cap, table_len;

static size_t slot_of(const void *p, size_t cap) {
    uintptr_t h = (uintptr_t)p;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return (size_t)h & (cap - 1);
}

static void table_add(Object *o) {
    if (2 * (table_len + 1) > table_cap) {
        size_t cap = table_cap ? 2 * table_cap : 1024;
        Object **grown = calloc(cap, sizeof *grown);
        if (!grown) die("out of memory");
        for (size_t i = 0; i < table_cap; i++)
            if (table[i]) {
                size_t j = slot_of(table[i], cap);
                while (grown[j]) j = (j + 1) & (cap - 1);
                grown[j] = table[i];
            }
        free(table);
        table = grown;
        table_cap = cap;
    }
    size_t j = slot_of(o, table_cap);
    while (table[j]) j = (j + 1) & (table_cap - 1);
    table[j] = o;
    table_len++;
}

static bool table_has(const void *p) {
    if (!table_cap) return false;
    for (size_t j = slot_of(p, table_cap); table[j]; j = (j + 1) & (table_cap - 1))
        if (table[j] == p) return true;
    return false;
}

static bool is_class(const void *p) {
    for (size_t i = 0; i < CLASS_COUNT; i++)
        if (p == (const void *)classes[i]) return true;
    return false;
}

static Object *new_object(const Class *isa) {
    Object *o = calloc(1, sizeof *o);
    if (!o) die("out of memory");
    o->isa = isa;
    o->refs = 1;
    pthread_mutex_lock(&object_lock);
    table_add(o);
    live_objects++;
    pthread_mutex_unlock(&object_lock);
    return o;
}

/* The object a pointer names, or death: what a message to garbage or to a freed object does. */
static Object *live(const void *p, const char *what) {
    pthread_mutex_lock(&object_lock);
    bool known = table_has(p);
    pthread_mutex_unlock(&object_lock);
    if (!known) die("%s: %p is not an object", what, p);
    Object *o = (Object *)p;
    if (o->refs <= 0) die("%s: message sent to deallocated instance %p of class %s", what, p, o->isa->name);
    return o;
}

static bool is_a(const void *p, const Class *cls) {
    if (!p || is_class(p)) return false;
    return live(p, cls->name)->isa == cls;
}

static Object *retain(Object *o) {
    if (!o) return NULL;
    live(o, "retain");
    pthread_mutex_lock(&object_lock);
    if (!o->immortal) o->refs++;
    pthread_mutex_unlock(&object_lock);
    return o;
}

static void dealloc(Object *o);

static void release(Object *o) {
    if (!o) return;
    live(o, "release");
    if (o->immortal) return;
    pthread_mutex_lock(&object_lock);
    bool last = --o->refs == 0;
    if (last) live_objects--;
    pthread_mutex_unlock(&object_lock);
    if (last) dealloc(o);
}

/* Autorelease pools: one stack per thread; NULL entries mark where each pool begins. */
static __thread Object **pool_stack;
static __thread size_t pool_len, pool_cap, pool_depth;

static void pool_append(Object *o) {
    if (pool_len == pool_cap) {
        pool_cap = pool_cap ? 2 * pool_cap : 256;
        pool_stack = realloc(pool_stack, pool_cap * sizeof *pool_stack);
        if (!pool_stack) die("out of memory");
    }
    pool_stack[pool_len++] = o;
}

static Object *autorelease(Object *o) {
    if (!o) return NULL;
    if (pool_depth == 0) {
        failure("object %p of class %s autoreleased with no pool in place - just leaking", (void *)o, o->isa->name);
        return o;
    }
    pool_append(o);
    return o;
}

EXPORT void *objc_autoreleasePoolPush(void) {
    pool_append(NULL);
    pool_depth++;
    return (void *)(uintptr_t)pool_len; /* the marker's index + 1: never NULL */
}

EXPORT void objc_autoreleasePoolPop(void *token) {
    size_t mark = (size_t)(uintptr_t)token;
    if (mark == 0 || mark > pool_len || pool_stack[mark - 1] != NULL)
        die("objc_autoreleasePoolPop: %p is not a pool of this thread", token);
    while (pool_len > mark - 1) {
        Object *o = pool_stack[--pool_len];
        if (o) release(o);
        else pool_depth--;
    }
}

EXPORT long standin_live_objects(void) { return live_objects; }

/* ------------------------------------------------------------------------------------------------------------------
 * Foundation values */

static Object *make_string(const char *text) {
    Object *s = new_object(&NSString);
    s->length = strlen(text);
    s->bytes = strdup(text);
    if (!s->bytes) die("out of memory");
    return s;
}

static Object *make_data(const void *bytes, size_t length) {
    Object *d = new_object(&NSData);
    d->length = length;
    d->bytes = malloc(length ? length : 1);
    if (!d->bytes) die("out of memory");
    if (length) memcpy(d->bytes, bytes, length);
    return d;
}

static Object *make_number(long long value) {
    Object *n = new_object(&NSNumber);
    n->number = value;
    return n;
}

/* A collection owning (retaining) its entries; nil entries raise NSInvalidArgumentException in Foundation. */
static Object *make_collection(const Class *isa, void *const *items, void *const *keys, size_t count,
                               const char *selector) {
    if (count && !items) die("%s: NULL objects for count %zu", selector, count);
    if (count && isa == &NSDictionary && !keys) die("%s: NULL keys for count %zu", selector, count);
    for (size_t i = 0; i < count; i++) {
        if (!items[i]) die("*** %s: attempt to insert nil object from objects[%zu]", selector, i);
        live(items[i], selector);
        if (keys) {
            if (!keys[i]) die("*** %s: attempt to insert nil key from keys[%zu]", selector, i);
            live(keys[i], selector);
        }
    }
    Object *c = new_object(isa);
    c->count = count;
    c->items = calloc(count ? count : 1, sizeof *c->items);
    if (keys) c->keys = calloc(count ? count : 1, sizeof *c->keys);
    for (size_t i = 0; i < count; i++) {
        c->items[i] = retain((Object *)items[i]);
        if (keys) c->keys[i] = retain((Object *)keys[i]);
    }
    return c;
}

static bool text_equals(const Object *s, const char *text) {
    return s && s->isa == &NSString && strcmp(s->bytes, text) == 0;
}

static Object *dict_get(const Object *dict, const char *key) {
    for (size_t i = 0; i < dict->count; i++)
        if (text_equals(dict->keys[i], key)) return dict->items[i];
    return NULL;
}

/* Text buffers for descriptions. */
typedef struct { char *text; size_t len, cap; } Buffer;

static void put(Buffer *b, const char *fmt, ...) {
    va_list ap;
    for (;;) {
        size_t room = b->cap - b->len;
        va_start(ap, fmt);
        int n = vsnprintf(b->text ? b->text + b->len : NULL, room, fmt, ap);
        va_end(ap);
        if (n < 0) die("vsnprintf failed");
        if ((size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        b->cap = 2 * (b->cap + (size_t)n + 64);
        b->text = realloc(b->text, b->cap);
        if (!b->text) die("out of memory");
    }
}

static void append(Buffer *b, const void *bytes, size_t length) {
    if (b->len + length + 1 > b->cap) {
        b->cap = 2 * (b->len + length + 1);
        b->text = realloc(b->text, b->cap);
        if (!b->text) die("out of memory");
    }
    memcpy(b->text + b->len, bytes, length);
    b->len += length;
}

static void describe(Buffer *b, const Object *o) {
    if (!o) put(b, "(null)");
    else if (o->isa == &NSString) put(b, "%s", o->bytes);
    else if (o->isa == &NSNumber) put(b, "%lld", o->number);
    else if (o->isa == &NSData) put(b, "{length = %zu}", o->length);
    else if (o->isa == &NSArray || o->isa == &NSDictionary) {
        put(b, o->isa == &NSArray ? "(" : "{");
        for (size_t i = 0; i < o->count; i++) {
            if (o->keys) {
                describe(b, o->keys[i]);
                put(b, " = ");
            }
            describe(b, o->items[i]);
            put(b, o->keys ? "; " : (i + 1 < o->count ? ", " : ""));
        }
        put(b, o->isa == &NSArray ? ")" : "}");
    } else if (o->isa == &NSError) {
        put(b, "Error Domain=%s Code=%ld \"", o->domain->bytes, o->code);
        describe(b, dict_get(o->user_info, "NSLocalizedDescription"));
        put(b, "\" UserInfo=");
        describe(b, o->user_info);
    } else put(b, "<%s: %p>", o->isa->name, (const void *)o);
}

static Object *description(const Object *o) {
    Buffer b = {0};
    describe(&b, o);
    Object *s = make_string(b.text);
    free(b.text);
    return autorelease(s);
}

/* An autoreleased NSError stored at *out (when out is not NULL). */
static void set_error(void **out, const char *domain, long code, const char *summary, const char *reason) {
    Object *keys[2] = {make_string("NSLocalizedDescription"), make_string("NSLocalizedFailureReason")};
    Object *values[2] = {make_string(summary), make_string(reason ? reason : "")};
    size_t n = reason ? 2 : 1;
    Object *info = make_collection(&NSDictionary, (void *const *)values, (void *const *)keys, n, "userInfo");
    for (int i = 0; i < 2; i++) {
        release(keys[i]);
        release(values[i]);
    }
    Object *e = new_object(&NSError);
    e->domain = make_string(domain);
    e->code = code;
    e->user_info = info;
    autorelease(e);
    if (out) *out = e;
}

/* ------------------------------------------------------------------------------------------------------------------
 * Selectors and classes */

static pthread_mutex_t selector_lock = PTHREAD_MUTEX_INITIALIZER;
static char **selectors;
static size_t selector_count;

EXPORT const char *sel_registerName(const char *name) {
    if (!name) die("sel_registerName: NULL name");
    pthread_mutex_lock(&selector_lock);
    for (size_t i = 0; i < selector_count; i++)
        if (strcmp(selectors[i], name) == 0) {
            pthread_mutex_unlock(&selector_lock);
            return selectors[i];
        }
    selectors = realloc(selectors, (selector_count + 1) * sizeof *selectors);
    char *copy = strdup(name);
    if (!selectors || !copy) die("out of memory");
    selectors[selector_count++] = copy;
    pthread_mutex_unlock(&selector_lock);
    return copy;
}

EXPORT const void *objc_getClass(const char *name) {
    for (size_t i = 0; i < CLASS_COUNT; i++)
        if (name && strcmp(classes[i]->name, name) == 0) return classes[i];
    return NULL;
}

static const char *find_method(const char *const *methods, const char *sel) {
    for (; *methods; methods++)
        if (strcmp(*methods, sel) == 0) return *methods;
    return NULL;
}

EXPORT const void *class_getClassMethod(const void *cls, const char *sel) {
    if (!cls || !sel || !is_class(cls)) return NULL;
    return find_method(((const Class *)cls)->class_methods, sel);
}

EXPORT const void *class_getInstanceMethod(const void *cls, const char *sel) {
    if (!cls || !sel || !is_class(cls)) return NULL;
    const char *m = find_method(((const Class *)cls)->instance_methods, sel);
    return m ? m : find_method(object_methods, sel);
}

/* ------------------------------------------------------------------------------------------------------------------
 * The evaluation callback (the emulator, in Python) */

enum Stage { STAGE_COMPILE = 0, STAGE_LOAD = 1, STAGE_EVALUATE = 2, STAGE_UNLOAD = 3 };
typedef int (*Callback)(int stage, long model, long procedure, const char *directory, long n_in, void **in_base,
                        size_t *in_size, long n_out, void **out_base, size_t *out_size, char *message,
                        size_t message_size);
static Callback callback;

EXPORT void standin_set_callback(Callback cb) { __atomic_store_n(&callback, cb, __ATOMIC_SEQ_CST); }

/* Import $ORION_STANDIN_EMULATOR through the embedding interpreter; the module registers the callback. */
static void import_emulator(void) {
    const char *module = getenv("ORION_STANDIN_EMULATOR");
    if (!module || !*module) return;
    for (const char *c = module; *c; c++)
        if (!(*c == '.' || *c == '_' || (*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'z') ||
              (*c >= 'A' && *c <= 'Z'))) {
            failure("ORION_STANDIN_EMULATOR=%s is not a module name", module);
            return;
        }
    int (*initialized)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "Py_IsInitialized");
    int (*ensure)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "PyGILState_Ensure");
    void (*give_back)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "PyGILState_Release");
    int (*run)(const char *, void *) = (int (*)(const char *, void *))dlsym(RTLD_DEFAULT, "PyRun_SimpleStringFlags");
    if (!initialized || !ensure || !give_back || !run || !initialized()) {
        failure("no Python interpreter in this process to import %s", module);
        return;
    }
    char code[512];
    snprintf(code, sizeof code, "import importlib\nimportlib.import_module('%s')\n", module);
    int gil = ensure();
    if (run(code, NULL) != 0) failure("importing %s failed (traceback above)", module);
    give_back(gil);
}

static Callback emulator(void) {
    if (!__atomic_load_n(&callback, __ATOMIC_SEQ_CST)) import_emulator();
    return __atomic_load_n(&callback, __ATOMIC_SEQ_CST);
}

/* ------------------------------------------------------------------------------------------------------------------
 * Options the tests set: a failure to inject once, and compile side effects. */

static char fail_selector[256], fail_description[1024];
static long compile_count;
static long skip_net_plist; /* a compile that leaves no net.plist in the model directory (the model still loads) */

EXPORT void standin_fail_next(const char *selector, const char *text) {
    snprintf(fail_selector, sizeof fail_selector, "%s", selector ? selector : "");
    snprintf(fail_description, sizeof fail_description, "%s", text ? text : "");
}

EXPORT void standin_set_option(const char *name, long value) {
    if (strcmp(name, "skip_net_plist") == 0) skip_net_plist = value;
    else die("standin_set_option: unknown option %s", name);
}

EXPORT long standin_compiles(void) { return compile_count; }

static bool injected(const char *sel, void **error) {
    if (!fail_selector[0] || strcmp(fail_selector, sel) != 0) return false;
    fail_selector[0] = 0;
    failure("%s: injected failure: %s", sel, fail_description);
    set_error(error, "com.apple.appleneuralengine", 1, fail_description, "injected by the test");
    return true;
}

/* ------------------------------------------------------------------------------------------------------------------
 * Files */

static char *read_file(const char *path, size_t *length) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap + 1);
    size_t n;
    while (buf && (n = fread(buf + len, 1, cap - len, f)) > 0) {
        len += n;
        if (len == cap) buf = realloc(buf, (cap *= 2) + 1);
    }
    fclose(f);
    if (!buf) die("out of memory");
    buf[len] = 0;
    *length = len;
    return buf;
}

static bool write_file(const char *path, const void *bytes, size_t length) {
    char parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", path);
    for (char *p = parent + 1; (p = strchr(p, '/')); p++) { /* mkdir -p of the parents */
        *p = 0;
        mkdir(parent, 0700);
        *p = '/';
    }
    FILE *f = fopen(path, "wb");
    if (!f) return false;
    bool ok = fwrite(bytes, 1, length, f) == length;
    return fclose(f) == 0 && ok;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

static void temporary_directory(char *out, size_t size) {
    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp) tmp = "/tmp";
    snprintf(out, size, "%s%s", tmp, tmp[strlen(tmp) - 1] == '/' ? "" : "/");
}

EXPORT void *NSTemporaryDirectory(void) {
    char dir[PATH_MAX];
    temporary_directory(dir, sizeof dir);
    return autorelease(make_string(dir));
}

/* ------------------------------------------------------------------------------------------------------------------
 * _ANEInMemoryModelDescriptor, _ANEInMemoryModel */

#define MODEL_PATH "@model_path/"

static bool safe_relative(const char *path) {
    if (!*path || path[0] == '/' || strchr(path, '\\')) return false;
    for (const char *p = path; p; p = strchr(p, '/') ? strchr(p, '/') + 1 : NULL) {
        size_t n = strcspn(p, "/");
        if (n == 0 || (n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.')) return false;
    }
    return true;
}

/* +modelWithMILText:weights:optionsPlist: (reference section 2). */
static Object *new_descriptor(Object *mil, Object *weights, void *options) {
    if (!mil || is_class(mil) || live(mil, "modelWithMILText")->isa != &NSData)
        die("modelWithMILText:weights:optionsPlist: the MIL text must be NSData (UTF-8), got %s",
            !mil ? "nil" : is_class(mil) ? "a class" : mil->isa->name);
    if (!weights) die("modelWithMILText:weights:optionsPlist: weights is nil (pass an empty dictionary)");
    if (!is_a(weights, &NSDictionary))
        die("modelWithMILText:weights:optionsPlist: weights is a %s, not an NSDictionary",
            is_class(weights) ? "class" : weights->isa->name);
    if (options) {
        failure("modelWithMILText:weights:optionsPlist: optionsPlist must be nil");
        return NULL;
    }
    if (mil->length == 0) {
        failure("modelWithMILText:weights:optionsPlist: the MIL text is empty");
        return NULL;
    }
    for (size_t i = 0; i < weights->count; i++) {
        const Object *key = weights->keys[i], *entry = weights->items[i];
        if (key->isa != &NSString || strncmp(key->bytes, MODEL_PATH, strlen(MODEL_PATH)) != 0 ||
            !safe_relative(key->bytes + strlen(MODEL_PATH))) {
            failure("weights: key %s is not \"@model_path/<relative path>\"", key->isa == &NSString ? key->bytes
                                                                                                    : key->isa->name);
            return NULL;
        }
        const Object *offset = entry->isa == &NSDictionary ? dict_get(entry, "offset") : NULL;
        const Object *data = entry->isa == &NSDictionary ? dict_get(entry, "data") : NULL;
        if (entry->isa != &NSDictionary || entry->count != 2 || !offset || offset->isa != &NSNumber ||
            offset->number != 0 || !data || data->isa != &NSData) {
            failure("weights: the entry of %s must be {\"offset\": @0, \"data\": NSData}", key->bytes);
            return NULL;
        }
    }
    Object *d = new_object(&Descriptor);
    d->mil = retain(mil);
    d->weights = retain(weights);
    return autorelease(d);
}

static uint64_t fnv(uint64_t h, const void *bytes, size_t n) {
    for (size_t i = 0; i < n; i++) h = (h ^ ((const unsigned char *)bytes)[i]) * 0x100000001b3ULL;
    return h;
}

static int compare_keys(const void *a, const void *b) {
    return strcmp((*(Object *const *)a)->bytes, (*(Object *const *)b)->bytes);
}

/* The weight keys in sorted order (a malloc'd array the caller frees). */
static Object **sorted_keys(const Object *weights) {
    Object **keys = malloc((weights->count ? weights->count : 1) * sizeof *keys);
    if (!keys) die("out of memory");
    memcpy(keys, weights->keys, weights->count * sizeof *keys);
    qsort(keys, weights->count, sizeof *keys, compare_keys);
    return keys;
}

/* "The same MIL text and the same weight-dict keys give the same identifier" (reference section 2). */
static uint64_t mil_digest(const Object *descriptor) {
    return fnv(0xcbf29ce484222325ULL, descriptor->mil->bytes, descriptor->mil->length);
}

static Object *new_model(Object *descriptor) {
    if (!is_a(descriptor, &Descriptor)) die("inMemoryModelWithDescriptor: the argument is not a descriptor");
    Object *m = new_object(&Model);
    m->descriptor = retain(descriptor);
    uint64_t a = mil_digest(descriptor), b = fnv(0x84222325cbf29ce4ULL, descriptor->mil->bytes,
                                                 descriptor->mil->length);
    Object **keys = sorted_keys(descriptor->weights);
    for (size_t i = 0; i < descriptor->weights->count; i++) {
        a = fnv(a, keys[i]->bytes, keys[i]->length + 1);
        b = fnv(b, keys[i]->bytes, keys[i]->length + 1);
    }
    free(keys);
    snprintf(m->identifier, sizeof m->identifier, "%016llX%016llX", (unsigned long long)a, (unsigned long long)b);
    return autorelease(m);
}

static void model_directory(const Object *m, char *out, size_t size) {
    char tmp[PATH_MAX];
    temporary_directory(tmp, sizeof tmp);
    snprintf(out, size, "%s%s", tmp, m->identifier);
}

static bool check_qos_and_options(const char *sel, unsigned qos, const void *options, void **error) {
    if (qos > 63) {
        failure("%s: QoS %u is outside 0-63", sel, qos);
        set_error(error, "com.apple.appleneuralengine", 2, "Invalid QoS", "QoS must be 0-63");
        return false;
    }
    if (!is_a(options, &NSDictionary)) {
        failure("%s: options must be an NSDictionary ({}), got %s", sel, options ? "another object" : "nil");
        set_error(error, "com.apple.appleneuralengine", 2, "Invalid options", "options must be a dictionary");
        return false;
    }
    return true;
}

/* Errors of the emulator callback become the framework's errors. */
static bool run_callback(int stage, const Object *m, long procedure, const char *directory, long n_in,
                         void **in_base, size_t *in_size, long n_out, void **out_base, size_t *out_size, char *message,
                         size_t size) {
    Callback cb = emulator();
    if (!cb) {
        snprintf(message, size, "no emulator callback: set ORION_STANDIN_EMULATOR or call standin_set_callback");
        return false;
    }
    message[0] = 0;
    return cb(stage, (long)(uintptr_t)m, procedure, directory, n_in, in_base, in_size, n_out, out_base, out_size,
              message, size) == 0;
}

static const char NET_PLIST_HEADER[] = "orion-standin net.plist 1";

/* -compileWithQoS:options:error: — compiles the files in NSTemporaryDirectory()/<identifier>/ (written BEFORE
 * compiling, reference section 2) and leaves net.plist and data there ("data" is a byte copy of the weight file,
 * per Orion; with several weight files, the stand-in's own layout: their concatenation in key order). */
static BOOL compile_model(Object *m, unsigned qos, void *options, void **error) {
    const char *sel = "compileWithQoS:options:error:";
    if (injected(sel, error) || !check_qos_and_options(sel, qos, options, error)) return 0;
    char dir[PATH_MAX], path[PATH_MAX], message[4096];
    model_directory(m, dir, sizeof dir);
    const Object *descriptor = m->descriptor;
    snprintf(path, sizeof path, "%s/model.mil", dir);
    size_t length;
    char *text = read_file(path, &length);
    if (!text || length != descriptor->mil->length || memcmp(text, descriptor->mil->bytes, length) != 0) {
        failure("%s: %s %s", sel, path, text ? "differs from the descriptor's MIL text" : "is missing");
        set_error(error, "com.apple.appleneuralengine.compiler", 1, "ANECCompile() FAILED",
                  text ? "model.mil differs from the MIL text" : "model.mil is missing from the model directory");
        free(text);
        return 0;
    }
    free(text);
    Buffer plist = {0}, data = {0};
    put(&plist, "%s\nmil %016llx\nweights %zu\n", NET_PLIST_HEADER, (unsigned long long)mil_digest(descriptor),
        descriptor->weights->count);
    Object **keys = sorted_keys(descriptor->weights);
    bool ok = true;
    for (size_t i = 0; ok && i < descriptor->weights->count; i++) {
        const char *rel = keys[i]->bytes + strlen(MODEL_PATH);
        snprintf(path, sizeof path, "%s/%s", dir, rel);
        char *bytes = read_file(path, &length);
        if (!bytes) {
            failure("%s: weight file %s is missing", sel, path);
            set_error(error, "com.apple.appleneuralengine.compiler", 1, "ANECCompile() FAILED",
                      "a weight file named in the weights dictionary is missing from the model directory");
            ok = false;
            break;
        }
        put(&plist, "%zu %s\n", length, rel);
        append(&data, bytes, length);
        free(bytes);
    }
    free(keys);
    if (ok && !run_callback(STAGE_COMPILE, m, 0, dir, 0, NULL, NULL, 0, NULL, NULL, message, sizeof message)) {
        failure("%s: %s", sel, message);
        set_error(error, "com.apple.appleneuralengine.compiler", 1, "ANECCompile() FAILED", message);
        ok = false;
    }
    if (ok) {
        snprintf(path, sizeof path, "%s/data", dir);
        ok = write_file(path, data.text ? data.text : "", data.len);
        if (ok && !skip_net_plist) {
            snprintf(path, sizeof path, "%s/net.plist", dir);
            ok = write_file(path, plist.text, plist.len);
        }
        if (!ok) {
            failure("%s: cannot write %s (%s)", sel, path, strerror(errno));
            set_error(error, "com.apple.appleneuralengine.compiler", 1, "ANECCompile() FAILED", strerror(errno));
        }
    }
    if (ok) {
        free(m->compiled_plist);
        m->compiled_plist = strdup(plist.text);
    }
    free(plist.text);
    free(data.text);
    if (!ok) return 0;
    compile_count++;
    if (m->state == CREATED) m->state = COMPILED;
    return 1;
}

/* -loadWithQoS:options:error: — loads net.plist + data (the compiled program) from the model directory; the weights
 * are what data holds, not the weight files (weights are baked at compile time: catalog #7). */
static BOOL load_model(Object *m, unsigned qos, void *options, void **error) {
    const char *sel = "loadWithQoS:options:error:";
    if (injected(sel, error) || !check_qos_and_options(sel, qos, options, error)) return 0;
    if (m->state == LOADED) {
        failure("%s: model %s is already loaded", sel, m->identifier);
        set_error(error, "com.apple.appleneuralengine", 3, "Model already loaded", NULL);
        return 0;
    }
    char dir[PATH_MAX], path[PATH_MAX], message[4096];
    model_directory(m, dir, sizeof dir);
    size_t plist_len = 0, data_len = 0;
    snprintf(path, sizeof path, "%s/net.plist", dir);
    char *plist = read_file(path, &plist_len);
    if (!plist && m->compiled_plist) plist = strdup(m->compiled_plist); /* skip_net_plist: held by the model */
    snprintf(path, sizeof path, "%s/data", dir);
    char *data = read_file(path, &data_len);
    const char *problem = NULL;
    char expect[64];
    snprintf(expect, sizeof expect, "mil %016llx\n", (unsigned long long)mil_digest(m->descriptor));
    if (!plist || !data) problem = "the model directory has no compiled program (net.plist and data)";
    else if (strncmp(plist, NET_PLIST_HEADER, strlen(NET_PLIST_HEADER)) != 0 || !strstr(plist, expect))
        problem = "net.plist was not compiled from this model's MIL text";
    char snapshot[PATH_MAX];
    temporary_directory(path, sizeof path);
    snprintf(snapshot, sizeof snapshot, "%sstandin-load-XXXXXX", path);
    if (!problem && !mkdtemp(snapshot)) problem = "cannot create a load directory";
    if (!problem) {
        snprintf(path, sizeof path, "%s/model.mil", snapshot);
        if (!write_file(path, m->descriptor->mil->bytes, m->descriptor->mil->length)) problem = "cannot write";
        const char *line = strstr(plist, "\nweights ");
        size_t count = line ? strtoul(line + 9, NULL, 10) : 0, used = 0;
        line = line ? strchr(line + 1, '\n') : NULL;
        for (size_t i = 0; !problem && i < count; i++) {
            char *end;
            size_t size = line ? strtoul(line + 1, &end, 10) : 0;
            if (!line || *end != ' ') {
                problem = "net.plist is damaged";
                break;
            }
            const char *rel = end + 1, *stop = strchr(rel, '\n');
            char name[PATH_MAX];
            snprintf(name, sizeof name, "%.*s", (int)(stop ? stop - rel : (long)strlen(rel)), rel);
            if (!safe_relative(name) || used + size > data_len) {
                problem = "net.plist does not match the data file";
                break;
            }
            snprintf(path, sizeof path, "%s/%s", snapshot, name);
            if (!write_file(path, data + used, size)) problem = "cannot write";
            used += size;
            line = stop;
        }
        if (!problem && used != data_len) problem = "net.plist does not match the data file";
        if (!problem &&
            !run_callback(STAGE_LOAD, m, 0, snapshot, 0, NULL, NULL, 0, NULL, NULL, message, sizeof message))
            problem = message;
        nftw(snapshot, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    }
    free(plist);
    free(data);
    if (problem) {
        failure("%s: %s (%s)", sel, problem, dir);
        set_error(error, "com.apple.appleneuralengine", 3, "Load failed", problem);
        return 0;
    }
    static long loads;
    m->load_id = __atomic_add_fetch(&loads, 1, __ATOMIC_SEQ_CST);
    m->state = LOADED;
    return 1;
}

static BOOL unload_model(Object *m, unsigned qos, void **error) {
    const char *sel = "unloadWithQoS:error:";
    if (injected(sel, error)) return 0;
    if (qos > 63) {
        failure("%s: QoS %u is outside 0-63", sel, qos);
        set_error(error, "com.apple.appleneuralengine", 2, "Invalid QoS", "QoS must be 0-63");
        return 0;
    }
    if (m->state != LOADED) {
        failure("%s: model %s is not loaded", sel, m->identifier);
        set_error(error, "com.apple.appleneuralengine", 3, "Model not loaded", NULL);
        return 0;
    }
    char message[1024];
    run_callback(STAGE_UNLOAD, m, 0, NULL, 0, NULL, NULL, 0, NULL, NULL, message, sizeof message);
    m->state = COMPILED;
    return 1;
}

/* ------------------------------------------------------------------------------------------------------------------
 * _ANEIOSurfaceObject, _ANERequest, evaluation */

static bool indices_are_0_to_n(const Object *indices, size_t n) {
    if (!is_a(indices, &NSArray) || indices->count != n) return false;
    for (size_t i = 0; i < n; i++)
        if (indices->items[i]->isa != &NSNumber || indices->items[i]->number != (long long)i) return false;
    return true;
}

static bool surface_objects(const Object *array) {
    if (!is_a(array, &NSArray) || array->count == 0) return false;
    for (size_t i = 0; i < array->count; i++)
        if (array->items[i]->isa != &SurfaceObject) return false;
    return true;
}

/* +requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex: (reference 2). */
static Object *new_request(Object *inputs, Object *input_indices, Object *outputs, Object *output_indices,
                           void *weights_buffer, void *perf_stats, Object *procedure) {
    const char *problem = NULL;
    if (!surface_objects(inputs)) problem = "inputs must be a non-empty NSArray of _ANEIOSurfaceObject";
    else if (!surface_objects(outputs)) problem = "outputs must be a non-empty NSArray of _ANEIOSurfaceObject";
    else if (!indices_are_0_to_n(input_indices, inputs->count)) problem = "inputIndices must be @[@0 .. @(n-1)]";
    else if (!indices_are_0_to_n(output_indices, outputs->count)) problem = "outputIndices must be @[@0 .. @(n-1)]";
    else if (weights_buffer) problem = "weightsBuffer must be nil";
    else if (perf_stats) problem = "perfStats must be nil";
    else if (!is_a(procedure, &NSNumber) || procedure->number < 0) /* which function: the chip says (evaluate) */
        problem = "procedureIndex must be a non-negative NSNumber";
    if (problem) {
        failure("requestWithInputs:...: %s", problem);
        return NULL;
    }
    Object *r = new_object(&Request);
    r->inputs = retain(inputs);
    r->outputs = retain(outputs);
    r->input_indices = retain(input_indices);
    r->output_indices = retain(output_indices);
    r->procedure = retain(procedure);
    return autorelease(r);
}

#define STATUS_1D "ANEProgramProcessRequestDirect() Failed with status=0x1d : statusType=0x9: Program Inference error"

static BOOL evaluate_model(Object *m, unsigned qos, void *options, Object *request, void **error) {
    const char *sel = "evaluateWithQoS:options:request:error:";
    if (injected(sel, error) || !check_qos_and_options(sel, qos, options, error)) return 0;
    if (!is_a(request, &Request)) die("%s: the request is not an _ANERequest", sel);
    if (m->state != LOADED) {
        failure("%s: model %s is not loaded", sel, m->identifier);
        set_error(error, "com.apple.appleneuralengine", 3, "Model not loaded", NULL);
        return 0;
    }
    if (request->mapped_load_id && request->mapped_load_id != m->load_id) {
        failure("%s: the request's surfaces were mapped for another load of a model; build a new request", sel);
        set_error(error, "com.apple.appleneuralengine", 4, "Invalid request",
                  "the request was mapped for an earlier load; build a new request after every load");
        return 0;
    }
    request->mapped_load_id = m->load_id;
    long n_in = (long)request->inputs->count, n_out = (long)request->outputs->count;
    void *bases[n_in + n_out];
    size_t sizes[n_in + n_out];
    for (long i = 0; i < n_in + n_out; i++) {
        const Object *wrapper = i < n_in ? request->inputs->items[i] : request->outputs->items[i - n_in];
        bases[i] = wrapper->surface->memory;
        sizes[i] = wrapper->surface->alloc_size;
    }
    char message[4096];
    const char *side = NULL;
    for (long i = 1; i < n_in; i++)
        if (sizes[i] != sizes[0]) side = "input";
    for (long i = n_in + 1; i < n_in + n_out; i++)
        if (sizes[i] != sizes[n_in]) side = "output";
    if (side) { /* reference section 5: all surfaces of a side must have one allocation size */
        snprintf(message, sizeof message, "%s", STATUS_1D);
        failure("%s: %s surfaces of different allocation sizes", sel, side);
    } else if (run_callback(STAGE_EVALUATE, m, (long)request->procedure->number, NULL, n_in, bases, sizes, n_out,
                            bases + n_in, sizes + n_in, message, sizeof message)) {
        return 1;
    } else {
        failure("%s: %s", sel, message);
    }
    set_error(error, "com.apple.appleneuralengine", 8, message, NULL);
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------------
 * Deallocation */

static void dealloc(Object *o) {
    if (o->isa == &NSDictionary || o->isa == &NSArray) {
        for (size_t i = 0; i < o->count; i++) {
            release(o->items[i]);
            if (o->keys) release(o->keys[i]);
        }
        free(o->items);
        free(o->keys);
    } else if (o->isa == &NSError) {
        release(o->domain);
        release(o->user_info);
    } else if (o->isa == &Descriptor) {
        release(o->mil);
        release(o->weights);
    } else if (o->isa == &Model) {
        if (o->state == LOADED) {
            failure("model %s released while loaded (always unload before release, reference section 2)",
                    o->identifier);
            char message[1024];
            run_callback(STAGE_UNLOAD, o, 0, NULL, 0, NULL, NULL, 0, NULL, NULL, message, sizeof message);
        }
        release(o->descriptor);
        free(o->compiled_plist);
    } else if (o->isa == &Request) {
        release(o->inputs);
        release(o->outputs);
        release(o->input_indices);
        release(o->output_indices);
        release(o->procedure);
    } else if (o->isa == &SurfaceObject) {
        release(o->surface);
    } else if (o->isa == &IOSurface) {
        if (o->locks) failure("IOSurface %p released while locked", (void *)o);
        free(o->memory);
    }
    free(o->bytes);
    o->bytes = NULL;
    o->memory = NULL; /* the header stays: a zombie */
}

/* ------------------------------------------------------------------------------------------------------------------
 * objc_msgSend */

static Object *class_message(const Class *cls, const char *sel, va_list ap) {
    if (!find_method(cls->class_methods, sel)) die("+[%s %s]: unrecognized selector sent to class", cls->name, sel);
    if (cls == &NSString) {
        const char *text = va_arg(ap, const char *);
        if (!text) die("+[NSString stringWithUTF8String:]: NULL cString");
        return autorelease(make_string(text));
    }
    if (cls == &NSData) {
        const void *bytes = va_arg(ap, const void *);
        unsigned long length = va_arg(ap, unsigned long);
        if (!bytes && length) die("+[NSData dataWithBytes:length:]: NULL bytes for length %lu", length);
        return autorelease(make_data(bytes, length));
    }
    if (cls == &NSDictionary) {
        void *const *objects = va_arg(ap, void *const *);
        void *const *keys = va_arg(ap, void *const *);
        unsigned long count = va_arg(ap, unsigned long);
        return autorelease(make_collection(&NSDictionary, objects, keys, count, sel));
    }
    if (cls == &NSArray) {
        void *const *objects = va_arg(ap, void *const *);
        unsigned long count = va_arg(ap, unsigned long);
        return autorelease(make_collection(&NSArray, objects, NULL, count, sel));
    }
    if (cls == &NSNumber) return autorelease(make_number(va_arg(ap, int)));
    if (cls == &Descriptor) {
        Object *mil = va_arg(ap, Object *), *weights = va_arg(ap, Object *);
        void *options = va_arg(ap, void *);
        return new_descriptor(mil, weights, options);
    }
    if (cls == &Model) return new_model(va_arg(ap, Object *));
    if (cls == &Request) {
        Object *inputs = va_arg(ap, Object *), *input_indices = va_arg(ap, Object *);
        Object *outputs = va_arg(ap, Object *), *output_indices = va_arg(ap, Object *);
        void *weights_buffer = va_arg(ap, void *), *perf_stats = va_arg(ap, void *);
        Object *procedure = va_arg(ap, Object *);
        return new_request(inputs, input_indices, outputs, output_indices, weights_buffer, perf_stats, procedure);
    }
    /* _ANEIOSurfaceObject */
    Object *surface = va_arg(ap, Object *);
    if (!surface || !is_a(surface, &IOSurface)) {
        failure("objectWithIOSurface: %p is not an IOSurfaceRef", (void *)surface);
        return NULL;
    }
    Object *wrapper = new_object(&SurfaceObject);
    wrapper->surface = retain(surface);
    return autorelease(wrapper);
}

static void *instance_message(Object *o, const char *sel, va_list ap) {
    if (strcmp(sel, "retain") == 0) return retain(o);
    if (strcmp(sel, "release") == 0) {
        release(o);
        return NULL;
    }
    if (strcmp(sel, "autorelease") == 0) return autorelease(o);
    if (!find_method(o->isa->instance_methods, sel))
        die("-[%s %s]: unrecognized selector sent to instance %p", o->isa->name, sel, (void *)o);
    if (strcmp(sel, "description") == 0) return o->isa == &NSString ? o : description(o);
    if (o->isa == &NSString) return o->bytes; /* UTF8String */
    if (o->isa == &NSError) {
        if (strcmp(sel, "domain") == 0) return o->domain;
        if (strcmp(sel, "code") == 0) return (void *)(intptr_t)o->code;
        if (strcmp(sel, "userInfo") == 0) return o->user_info;
        return dict_get(o->user_info, "NSLocalizedDescription"); /* localizedDescription */
    }
    /* _ANEInMemoryModel */
    if (strcmp(sel, "hexStringIdentifier") == 0) return autorelease(make_string(o->identifier));
    unsigned qos = va_arg(ap, unsigned);
    if (strcmp(sel, "unloadWithQoS:error:") == 0) return (void *)(uintptr_t)unload_model(o, qos, va_arg(ap, void **));
    void *options = va_arg(ap, void *);
    if (strcmp(sel, "evaluateWithQoS:options:request:error:") == 0) {
        Object *request = va_arg(ap, Object *);
        return (void *)(uintptr_t)evaluate_model(o, qos, options, request, va_arg(ap, void **));
    }
    void **error = va_arg(ap, void **);
    if (strcmp(sel, "compileWithQoS:options:error:") == 0)
        return (void *)(uintptr_t)compile_model(o, qos, options, error);
    return (void *)(uintptr_t)load_model(o, qos, options, error);
}

EXPORT void *objc_msgSend(void *self, const char *sel, ...) {
    if (!self) return NULL; /* messages to nil return nil/0/NO */
    if (!sel) die("objc_msgSend: NULL selector");
    va_list ap;
    va_start(ap, sel);
    void *result = is_class(self) ? class_message(self, sel, ap) : instance_message(live(self, sel), sel, ap);
    va_end(ap);
    return result;
}

/* ------------------------------------------------------------------------------------------------------------------
 * CoreFoundation and IOSurface */

typedef struct { long version; void *retain, *release, *copy_description, *equal, *hash; } CallBacks;
EXPORT const CallBacks kCFTypeDictionaryKeyCallBacks = {0};
EXPORT const CallBacks kCFTypeDictionaryValueCallBacks = {0};

static Object property_keys[6];
static const char *const property_names[6] = {"IOSurfaceWidth", "IOSurfaceHeight", "IOSurfaceBytesPerElement",
                                              "IOSurfaceBytesPerRow", "IOSurfaceAllocSize", "IOSurfacePixelFormat"};
EXPORT const void *kIOSurfaceWidth = &property_keys[0];
EXPORT const void *kIOSurfaceHeight = &property_keys[1];
EXPORT const void *kIOSurfaceBytesPerElement = &property_keys[2];
EXPORT const void *kIOSurfaceBytesPerRow = &property_keys[3];
EXPORT const void *kIOSurfaceAllocSize = &property_keys[4];
EXPORT const void *kIOSurfacePixelFormat = &property_keys[5];

__attribute__((constructor)) static void start(void) {
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&object_lock, &attr);
    for (int i = 0; i < 6; i++) {
        property_keys[i] = (Object){.isa = &NSString, .refs = 1, .immortal = true, .bytes = (char *)property_names[i],
                                    .length = strlen(property_names[i])};
        table_add(&property_keys[i]);
    }
}

EXPORT void *CFNumberCreate(void *allocator, long type, const void *value) {
    if (allocator) die("CFNumberCreate: only the default allocator (NULL) is supported");
    if (!value) die("CFNumberCreate: NULL value pointer");
    long long v;
    switch (type) { /* the integer CFNumberTypes */
        case 1: case 7: v = *(const int8_t *)value; break;
        case 2: case 8: v = *(const int16_t *)value; break;
        case 3: case 9: v = *(const int32_t *)value; break;
        case 4: case 10: case 11: case 14: case 15: v = *(const int64_t *)value; break;
        default:
            failure("CFNumberCreate: number type %ld is not an integer type", type);
            return NULL;
    }
    return make_number(v);
}

EXPORT void *CFDictionaryCreate(void *allocator, void *const *keys, void *const *values, long count,
                                const CallBacks *key_callbacks, const CallBacks *value_callbacks) {
    if (allocator) die("CFDictionaryCreate: only the default allocator (NULL) is supported");
    if (key_callbacks != &kCFTypeDictionaryKeyCallBacks || value_callbacks != &kCFTypeDictionaryValueCallBacks) {
        failure("CFDictionaryCreate: pass &kCFTypeDictionaryKeyCallBacks and &kCFTypeDictionaryValueCallBacks so the "
                "dictionary retains its CF keys and values");
        return NULL;
    }
    if (count < 0) die("CFDictionaryCreate: negative count");
    return make_collection(&NSDictionary, values, keys, (size_t)count, "CFDictionaryCreate");
}

EXPORT void CFRelease(void *ref) {
    if (!ref) die("CFRelease() called with NULL");
    release(live(ref, "CFRelease"));
}

/* IOSurfaceCreate: a tensor travels in a flat surface (reference section 5): width = bytes, height 1, bytes per
 * element 1, bytes per row = bytes, alloc size = bytes, pixel format 0. Anything else fails loudly. */
EXPORT void *IOSurfaceCreate(void *properties) {
    if (!is_a(properties, &NSDictionary)) die("IOSurfaceCreate: the properties are not a CFDictionary");
    const Object *dict = properties;
    long long v[6];
    bool seen[6] = {false};
    for (size_t i = 0; i < dict->count; i++) {
        int k = -1;
        for (int j = 0; j < 6; j++)
            if (dict->keys[i] == &property_keys[j]) k = j;
        if (k < 0) {
            failure("IOSurfaceCreate: key %s is not one of the kIOSurface* constants used for tensors",
                    dict->keys[i]->isa == &NSString ? dict->keys[i]->bytes : dict->keys[i]->isa->name);
            return NULL;
        }
        if (dict->items[i]->isa != &NSNumber) {
            failure("IOSurfaceCreate: the value of %s is not a CFNumber", property_names[k]);
            return NULL;
        }
        v[k] = dict->items[i]->number;
        seen[k] = true;
    }
    for (int j = 0; j < 6; j++)
        if (!seen[j]) {
            failure("IOSurfaceCreate: %s is missing", property_names[j]);
            return NULL;
        }
    if (v[0] <= 0 || v[1] != 1 || v[2] != 1 || v[3] != v[0] || v[4] != v[0] || v[5] != 0) {
        failure("IOSurfaceCreate: not a flat tensor surface (width %lld, height %lld, bytes per element %lld, bytes "
                "per row %lld, alloc size %lld, pixel format %lld)", v[0], v[1], v[2], v[3], v[4], v[5]);
        return NULL;
    }
    void *memory = NULL;
    if (posix_memalign(&memory, 16384, (size_t)v[4]) != 0) return NULL;
    memset(memory, 0, (size_t)v[4]);
    Object *s = new_object(&IOSurface);
    s->memory = memory;
    s->alloc_size = (size_t)v[4];
    return s;
}

#define kIOReturnBadArgument ((int)0xE00002C2)
#define kIOReturnNotLocked ((int)0xE00002CD)

EXPORT int IOSurfaceLock(void *ref, uint32_t options, uint32_t *seed) {
    (void)seed;
    if (!is_a(ref, &IOSurface)) die("IOSurfaceLock: %p is not an IOSurfaceRef", ref);
    if (options > 1) {
        failure("IOSurfaceLock: options %u (0 to write, kIOSurfaceLockReadOnly = 1 to read)", options);
        return kIOReturnBadArgument;
    }
    Object *s = ref;
    if (s->locks && s->lock_options != options) {
        failure("IOSurfaceLock: already locked with options %u", s->lock_options);
        return kIOReturnBadArgument;
    }
    s->locks++;
    s->lock_options = options;
    return 0;
}

EXPORT int IOSurfaceUnlock(void *ref, uint32_t options, uint32_t *seed) {
    (void)seed;
    if (!is_a(ref, &IOSurface)) die("IOSurfaceUnlock: %p is not an IOSurfaceRef", ref);
    Object *s = ref;
    if (!s->locks) {
        failure("IOSurfaceUnlock: the surface is not locked");
        return kIOReturnNotLocked;
    }
    if (options != s->lock_options) {
        failure("IOSurfaceUnlock: options %u differ from the lock's %u", options, s->lock_options);
        return kIOReturnBadArgument;
    }
    s->locks--;
    return 0;
}

EXPORT void *IOSurfaceGetBaseAddress(void *ref) {
    if (!is_a(ref, &IOSurface)) die("IOSurfaceGetBaseAddress: %p is not an IOSurfaceRef", ref);
    return ((Object *)ref)->memory;
}

EXPORT size_t IOSurfaceGetAllocSize(void *ref) {
    if (!is_a(ref, &IOSurface)) die("IOSurfaceGetAllocSize: %p is not an IOSurfaceRef", ref);
    return ((Object *)ref)->alloc_size;
}

/* ------------------------------------------------------------------------------------------------------------------
 * libSystem: the facts a Mac reports about itself */

EXPORT int sysctlbyname(const char *name, void *old, size_t *old_length, void *new_value, size_t new_length) {
    static const char *const facts[][2] = {{"kern.ostype", "Darwin"},
                                           {"hw.machine", "arm64"},
                                           {"machdep.cpu.brand_string", "Apple M4 (Orion stand-in)"},
                                           {"kern.osversion", "25A000-standin"}};
    if (new_value || new_length) {
        errno = EPERM;
        return -1;
    }
    for (size_t i = 0; i < sizeof facts / sizeof facts[0]; i++) {
        if (strcmp(name, facts[i][0]) != 0) continue;
        size_t need = strlen(facts[i][1]) + 1;
        if (old) {
            if (*old_length < need) {
                errno = ENOMEM;
                return -1;
            }
            memcpy(old, facts[i][1], need);
        }
        *old_length = need;
        return 0;
    }
    errno = ENOENT;
    return -1;
}
