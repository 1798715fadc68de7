/* A SIGBUS handler for memory-mapped weights: when a mapped file is truncated while the model
 * runs, the next read of a vanished page raises SIGBUS. Python cannot handle it (the faulting
 * instruction would run again), so this prints the message it was given and exits with 1. */
#include <signal.h>
#include <string.h>
#include <unistd.h>

static char message[1024];
static size_t message_length;

static void on_sigbus(int signal_number) {
    (void)signal_number;
    ssize_t written = write(2, message, message_length);
    (void)written;
    _exit(1);
}

int install_sigbus_message(const char *text) {
    message_length = strlen(text);
    if (message_length > sizeof message) message_length = sizeof message;
    memcpy(message, text, message_length);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_sigbus;
    sigemptyset(&action.sa_mask);
    return sigaction(SIGBUS, &action, NULL);
}
